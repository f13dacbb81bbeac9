"""`elas-loadtest` against live servers: a real uvicorn server on loopback (tests/server_utils.py)
serving the demo checkpoint (a test checkpoint until the demo is installed), closed ports, HTTP
errors, and a `compare` over two servers.

Run: python -m pytest tests/test_loadtest_live.py -v
"""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from elas_serve.clients.cli import main
from elas_serve.clients.client import LoadTestError
from elas_serve.clients.compare import free_port
from elas_serve.clients.loadgen import LoadConfig, run_benchmark
from elas_serve.utils import DEMO_CHECKPOINT

from authors_ckpt import Variant, write_checkpoint
from server_utils import ServerThread

VLLM_KEYS = ("date", "backend", "model_id", "num_prompts", "request_rate", "burstiness", "max_concurrency",
             "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
             "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
             "max_output_tokens_per_s", "max_concurrent_requests", "input_lens", "output_lens", "ttfts",
             "itls", "latencies", "start_times", "errors", "generated_texts")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_file):
    if (DEMO_CHECKPOINT / "model.safetensors").exists():
        return DEMO_CHECKPOINT
    path = tmp_path_factory.mktemp("loadtest_ckpt")
    write_checkpoint(path, Variant("loadtest", vocab=320, extra_config={"eos_token_id": 0}))
    shutil.copy(tokenizer_file, path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    with ServerThread(ckpt, block_size=4) as s:
        yield s


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_short_run_writes_a_complete_json(server, tmp_path, capsys):
    code, out, err = run(["run", "--base-url", server.url, "--num-prompts", "4", "--max-concurrency", "2",
                          "--random-input-len", "12", "--random-output-len", "6", "--metric-percentiles", "50,99",
                          "--goodput", "ttft:60000", "tpot:60000", "--save-detailed", "--result-dir", str(tmp_path),
                          "--result-filename", "run.json", "--disable-tqdm"], capsys)
    assert code == 0, err
    assert "Serving Benchmark Result" in out and "Mean TPOT (ms):" in out
    r = json.loads((tmp_path / "run.json").read_text())
    for key in VLLM_KEYS:
        assert key in r, key
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p99"):
            assert r[f"{stat}_{name}_ms"] > 0, (stat, name)
    assert (r["completed"], r["failed"], r["errors_by_message"]) == (4, 0, {})
    assert r["output_lens"] == [6] * 4 and r["input_lens"] == [12] * 4 and r["total_output_tokens"] == 24
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])
    assert r["max_concurrent_requests"] <= 2 and r["server_ffn_backend"] == "dense"
    for itl, ttft, latency in zip(r["itls"], r["ttfts"], r["latencies"]):
        assert len(itl) >= 1 and latency == pytest.approx(ttft + sum(itl))
    delta = r["server_metrics_delta"]
    tokens = [v for k, v in delta.items() if k.startswith("elas:generation_tokens_total")]
    assert tokens == [24.0]  # the server counted what the client counted, over the run only
    assert any(k.startswith("elas:time_to_first_token_seconds_count") and v == 4 for k, v in delta.items())


def test_duration_and_poisson_bounds(server):
    cfg = LoadConfig(base_url=server.url, num_prompts=1000, duration=0.5, request_rate=20.0,
                     random_input_len=8, random_output_len=2, disable_tqdm=True)
    r = asyncio.run(run_benchmark(cfg))
    assert 1 <= r["completed"] < 1000 and r["failed"] == 0  # about 10 sent within 0.5 s


def test_unreachable_server_is_one_line_exit_1(capsys):
    code, _, err = run(["run", "--port", str(free_port()), "--num-prompts", "1"], capsys)
    assert code == 1 and "cannot reach" in err and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(LoadTestError, match="cannot reach"):
        asyncio.run(run_benchmark(LoadConfig(base_url=f"http://127.0.0.1:{free_port()}")))


def test_http_errors_are_counted_with_their_message(server, capsys):
    code, out, err = run(["run", "--base-url", server.url, "--num-prompts", "3", "--random-input-len", "8",
                          "--random-output-len", "2", "--top-k", "-5", "--disable-tqdm"], capsys)
    assert code == 1 and "no request succeeded" in err and "Traceback" not in err
    assert "Failed requests:                         3" in out
    assert "3 x HTTP 400: top_k must be" in out


def test_wrong_api_key_and_model_are_reported(ckpt, server, capsys, monkeypatch):
    code, _, err = run(["run", "--base-url", server.url, "--model", "nope"], capsys)
    assert code == 1 and "not 'nope'" in err
    with ServerThread(ckpt, api_key="secret") as locked:
        monkeypatch.setenv("OPENAI_API_KEY", "wrong")
        code, _, err = run(["run", "--base-url", locked.url, "--num-prompts", "1"], capsys)
        assert code == 1 and "HTTP 401" in err and err.count("\n") == 1
        monkeypatch.setenv("OPENAI_API_KEY", "secret")
        code, out, err = run(["run", "--base-url", locked.url, "--num-prompts", "1", "--random-input-len", "4",
                              "--random-output-len", "2", "--disable-tqdm"], capsys)
        assert code == 0 and "Successful requests:                     1" in out


def test_compare_two_servers_by_url(server, tmp_path, capsys):
    code, out, err = run(["compare", "--url", f"a={server.url}", "--url", f"b={server.url}",
                          "--concurrencies", "1,2", "--num-prompts", "2", "--random-input-len", "8",
                          "--random-output-len", "3", "--result-dir", str(tmp_path), "--result-filename", "cmp",
                          "--disable-tqdm"], capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "cmp.json").read_text())
    assert data["baseline"] == "a" and list(data["results"]) == ["a", "b"] and data["values"] == [1.0, 2.0]
    assert all(r["completed"] == 2 for rows in data["results"].values() for r in rows)
    assert [r["max_concurrency"] for r in data["results"]["b"]] == [1, 2]
    md = (tmp_path / "cmp.md").read_text()
    assert "## Ratios to `a`" in md and "| 2 | b |" in md and "cmp.png" in md
    assert (tmp_path / "cmp.png").stat().st_size > 0
    assert "| 1 | b |" in out
    (tmp_path / "cmp.md").unlink()
    assert main(["report", str(tmp_path / "cmp.json")]) == 0  # markdown made again from the JSON
    assert (tmp_path / "cmp.md").read_text() == md


def test_compare_reports_a_server_that_cannot_start(tmp_path, capsys):
    code, _, err = run(["compare", "--model", str(tmp_path / "missing"), "--backends", "dense",
                        "--concurrencies", "1", "--result-dir", str(tmp_path), "--disable-tqdm"], capsys)
    assert code == 1 and "the server exited with code 2" in err and "Traceback" not in err
    assert (tmp_path / "server_dense.log").exists()
