"""`elas-loadtest run` as a drop-in for `vllm bench serve`: vLLM's flags and command lines against a
real `elas-serve serve` process (the demo checkpoint, served under the model name of vLLM's docs),
the ShareGPT sample of tests/data, and what a run writes.

Run: python -m pytest tests/test_loadtest_vllm.py -v
"""

from __future__ import annotations

import json
import random
import shlex
import sys
from pathlib import Path

import httpx
import pytest
from serve_process import ServeProcess, free_port

from elas_serve.clients.cli import main
from elas_serve.clients.client import chunk_text
from elas_serve.clients.loadgen import arrival_offsets
from elas_serve.tokenizer import Tokenizer
from elas_serve.utils import DEMO_CHECKPOINT

MODEL = "NousResearch/Hermes-3-Llama-3.1-8B"  # the model of vLLM's docs, as the served name
SHAREGPT = Path(__file__).parent / "data" / "sharegpt_sample.json"
# docs/benchmarking/cli.md of vLLM, "Online Benchmark", as printed there:
VLLM_DOCS_COMMAND = r"""vllm bench serve \
  --backend vllm \
  --model NousResearch/Hermes-3-Llama-3.1-8B \
  --endpoint /v1/completions \
  --dataset-name sharegpt \
  --dataset-path <your data path>/ShareGPT_V3_unfiltered_cleaned_split.json \
  --num-prompts 10"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    cmd = [sys.executable, "-m", "elas_serve.cli", "serve", "--port", str(port), "--served-model-name", MODEL,
           "--num-kv-blocks", "1024"]
    with ServeProcess(cmd, port, log) as s:
        yield s


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def small(server, *flags: str) -> list[str]:
    return ["run", "--port", str(server.port), "--disable-tqdm", *flags]


def test_vllm_docs_command_runs_unchanged(server, tmp_path, capsys):
    """vLLM's command with its two placeholders filled: the data path, and the port of this server."""
    command = VLLM_DOCS_COMMAND.replace("<your data path>/ShareGPT_V3_unfiltered_cleaned_split.json", str(SHAREGPT))
    argv = shlex.split(command.replace("\\\n", " "))  # the shell's line continuations
    assert argv[:3] == ["vllm", "bench", "serve"]
    code, out, err = run(["run", *argv[3:], "--port", str(server.port)], capsys)
    assert code == 0, err
    assert "Successful requests:                     10" in out and "Failed requests:                         0" in out
    assert "Mean TTFT (ms):" in out and "P99 ITL (ms):" in out


def test_sharegpt_lengths_shuffle_and_output_len(server, tmp_path, capsys):
    code, _, err = run(small(server, "--backend", "vllm", "--dataset-name", "sharegpt", "--dataset-path",
                             str(SHAREGPT), "--tokenizer", str(DEMO_CHECKPOINT), "--sharegpt-output-len", "5",
                             "--ignore-eos", "--num-prompts", "4", "--save-detailed", "--result-dir", str(tmp_path),
                             "--result-filename", "sg.json"), capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "sg.json").read_text())
    assert (r["backend"], r["endpoint_type"], r["tokenizer_id"]) == ("vllm", "vllm", str(DEMO_CHECKPOINT))
    assert r["output_lens"] == [5] * 4 and r["completed"] == 4  # --ignore-eos: exactly the asked length
    # vLLM's order: random.seed(0); random.shuffle(entries); the first four that fit
    tok = Tokenizer.from_path(DEMO_CHECKPOINT)
    entries = json.loads(SHAREGPT.read_text())
    random.Random(0).shuffle(entries)
    expected = [len(tok.encode(e["conversations"][0]["value"])) for e in entries[:4]]
    assert r["input_lens"] == expected
    assert r["generated_texts"][0] and r["total_output_tokens"] == 20


def test_sharegpt_output_len_defaults_to_the_reference_reply(server, tmp_path, capsys):
    code, out, err = run(small(server, "--dataset-name", "sharegpt", "--dataset-path", str(SHAREGPT), "--tokenizer",
                               "some-org/not-a-local-path", "--ignore-eos", "--num-prompts", "2", "--disable-shuffle",
                               "--save-detailed", "--result-dir", str(tmp_path), "--result-filename", "r.json"), capsys)
    assert code == 0, err
    assert "not a local path: counting tokens with the server's /tokenize" in out
    tok = Tokenizer.from_path(DEMO_CHECKPOINT)
    entries = json.loads(SHAREGPT.read_text())[:2]  # --disable-shuffle: file order
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["output_lens"] == [len(tok.encode(e["conversations"][1]["value"])) for e in entries]


def test_chat_backend_streams_chat_completions(server, tmp_path, capsys):
    code, out, err = run(small(server, "--backend", "openai-chat", "--num-prompts", "3", "--random-input-len", "12",
                               "--random-output-len", "4", "--save-detailed", "--result-dir", str(tmp_path),
                               "--result-filename", "chat.json"), capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "chat.json").read_text())
    assert r["endpoint"] == "/v1/chat/completions" and r["backend"] == "openai-chat"
    assert r["output_lens"] == [4] * 3  # random prompts: ignore_eos as vLLM forces it
    assert all(len(itl) == 3 for itl in r["itls"])  # 4 tokens: the role-only chunk is not a token
    assert all(p > 12 for p in r["input_lens"])  # the server's count: the chat template adds tokens
    code, _, err = run(small(server, "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
                             "--dataset-name", "custom", "--dataset-path", str(write_prompts(tmp_path)),
                             "--custom-output-len", "3", "--num-prompts", "2"), capsys)
    assert code == 0, err


def write_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Elizabeth walked"}\n{"prompt": "After dinner, the ladies", "output_tokens": 2}\n')
    return path


def test_role_chunk_is_not_the_first_token():
    assert chunk_text({"delta": {"role": "assistant", "content": ""}, "finish_reason": None}, chat=True) is None
    assert chunk_text({"delta": {"content": "Hi"}, "finish_reason": None}, chat=True) == "Hi"
    assert chunk_text({"delta": {"content": ""}, "finish_reason": "stop"}, chat=True) == ""
    assert chunk_text({"text": "x"}, chat=False) == "x"


def test_metadata_and_result_keys(server, tmp_path, capsys):
    code, _, err = run(small(server, "--num-prompts", "2", "--random-input-len", "8", "--random-output-len", "3",
                             "--metadata", "version=0.3.3", "tp=1", "--save-result", "--result-dir", str(tmp_path),
                             "--result-filename", "m.json"), capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "m.json").read_text())
    assert (r["version"], r["tp"]) == ("0.3.3", "1")
    assert len(r["latencies"]) == len(r["queue_times"]) == 2 and r["rtfx"] == 0.0  # always, as vLLM
    assert "ttfts" not in r and "input_lens" not in r  # those only with --save-detailed
    assert r["model_id"] == MODEL and r["tokenizer_id"] == MODEL
    code, _, err = run(small(server, "--metadata", "oops"), capsys)
    assert code == 2 and "KEY=VALUE" in err
    code, _, err = run(small(server, "--num-prompts", "1", "--random-input-len", "4", "--random-output-len", "2",
                             "--metadata", "duration=1"), capsys)
    assert code == 2 and "overwrite" in err


def test_random_prefix_len_is_shared_and_cached(server, tmp_path, capsys):
    code, _, err = run(small(server, "--num-prompts", "3", "--max-concurrency", "1", "--random-prefix-len", "32",
                             "--input-len", "5", "--output-len", "2", "--save-detailed", "--result-dir",
                             str(tmp_path), "--result-filename", "p.json", "--seed", "7"), capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "p.json").read_text())
    assert r["input_lens"] == [37] * 3 and r["output_lens"] == [2] * 3
    hits = sum(v for k, v in r["server_metrics_delta"].items() if k.startswith("elas:prefix_cache_hits_total"))
    assert hits >= 2 * 32  # the 2nd and 3rd request found the 32-token prefix (two 16-token blocks)


def test_first_request_at_t0_so_a_short_duration_still_sends(server, capsys):
    second = float(arrival_offsets(4, 1.0, 1.0, 0)[1])
    code, out, err = run(small(server, "--request-rate", "1", "--duration", f"{min(second, 1.0) / 2:.3f}",
                               "--num-prompts", "4", "--random-input-len", "4", "--random-output-len", "2"), capsys)
    assert code == 0, err
    assert "Successful requests:                     1" in out and "Failed requests:                         0" in out


def test_append_result_and_extra_body(server, tmp_path, capsys):
    for _ in range(2):
        code, _, err = run(small(server, "--num-prompts", "1", "--random-input-len", "4", "--random-output-len", "6",
                                 "--extra-body", '{"max_tokens": 2}', "--append-result", "--result-dir", str(tmp_path),
                                 "--result-filename", "a.json"), capsys)
        assert code == 0, err
    lines = (tmp_path / "a.json").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["total_output_tokens"] == 2 for line in lines)


@pytest.mark.parametrize("argv, message", [
    (["--backend", "openai", "--endpoint", "/v1/chat/completions"], "text completions endpoint"),
    (["--backend", "openai-chat", "--endpoint", "/v1/completions"], "chat completions endpoint"),
    (["--dataset-name", "sharegpt"], "needs --dataset-path"),
    (["--dataset-name", "random", "--dataset-path", "x.json"], "not random"),
])
def test_bad_vllm_flags_exit_2(argv, message, capsys):
    code, _, err = run(["run", "--port", str(free_port()), *argv], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:  # argparse's own: an unknown backend
        main(["run", "--backend", "tgi"])
    assert e.value.code == 2 and "invalid choice: 'tgi'" in capsys.readouterr().err


def test_bad_sharegpt_file_is_one_line(server, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"conversations": [{"value": "only one turn"}]}]')
    code, _, err = run(small(server, "--dataset-name", "sharegpt", "--dataset-path", str(bad)), capsys)
    assert code == 2 and "no entry has two conversation turns" in err and err.count("\n") == 1


def test_compare_without_matplotlib_says_so_and_claims_no_png(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, out, err = run(["compare", "--url", f"a={server.url}", "--concurrencies", "1", "--num-prompts", "1",
                          "--random-input-len", "4", "--random-output-len", "2", "--result-dir", str(tmp_path),
                          "--result-filename", "c", "--disable-tqdm"], capsys)
    assert code == 0, err
    assert "no PNG: matplotlib is not installed" in out and ".png" not in out.split("no PNG")[0]
    assert not (tmp_path / "c.png").exists() and "c.png" not in (tmp_path / "c.md").read_text()
    assert httpx.get(f"{server.url}/health").status_code == 200

