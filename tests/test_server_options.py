"""Operator options and honest request fields: what a vLLM user expects to find, against a real
server. Unsupported fields are a 400 naming them; the cheap ones are implemented as vLLM does them.

Run: python -m pytest tests/test_server_options.py -v
"""

from __future__ import annotations

import shutil
import signal

import httpx
import openai
import pytest

from authors_ckpt import Variant, write_checkpoint
from server_utils import MODEL_NAME, ServerThread, start

VOCAB = 320


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_file):
    path = tmp_path_factory.mktemp("options_ckpt")
    write_checkpoint(path, Variant("options", vocab=VOCAB, extra_config={"eos_token_id": 0}))
    shutil.copy(tokenizer_file, path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    with ServerThread(ckpt) as s:
        yield s


def post(server, path: str, **body) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json={"model": MODEL_NAME, **body}, timeout=60)


def completion(server, **body) -> dict:
    r = post(server, "/v1/completions", **body)
    assert r.status_code == 200, r.text
    return r.json()


GREEDY = dict(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("path,field,value", [
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/chat/completions", "tool_choice", "auto"),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ("/v1/chat/completions", "functions", [{"name": "f"}]),
    ("/v1/completions", "guided_json", {"type": "object"}),
    ("/v1/completions", "guided_choice", ["a", "b"]),
    ("/v1/completions", "response_format", {"type": "json_schema", "json_schema": {}}),
    ("/v1/completions", "logits_processors", ["x"]),
])
def test_unsupported_fields_are_a_400_naming_them(server, path, field, value):
    body = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    r = post(server, path, **body, **{field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field and "not supported" in r.text


def test_fields_that_ask_for_nothing_pass(server):
    msgs = [{"role": "user", "content": "hi"}]
    r = post(server, "/v1/chat/completions", messages=msgs, max_tokens=2, tools=[], tool_choice="none",
             response_format={"type": "text"}, parallel_tool_calls=False, some_unknown_field=1)
    assert r.status_code == 200, r.text


def test_include_stop_str_in_output(server):
    full = completion(server, prompt="It is a truth", **GREEDY)["choices"][0]["text"]
    stop = next(full[i:i + 2] for i in range(2, len(full) - 2) if full.find(full[i:i + 2]) == i
                and "\ufffd" not in full[i - 1:i + 3])
    cut = completion(server, prompt="It is a truth", stop=[stop], **GREEDY)["choices"][0]
    kept = completion(server, prompt="It is a truth", stop=[stop], include_stop_str_in_output=True,
                      **GREEDY)["choices"][0]
    assert cut["text"] == full[:full.find(stop)] and cut["stop_reason"] == stop
    assert kept["text"] == full[:full.find(stop) + len(stop)] and kept["finish_reason"] == "stop"


def test_truncate_prompt_tokens_keeps_the_last_ones(server):
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "It is a truth universally acknowledged"}).json()["tokens"]
    r = completion(server, prompt=ids, truncate_prompt_tokens=3, **GREEDY)
    assert r["usage"]["prompt_tokens"] == 3
    assert r["choices"][0]["text"] == completion(server, prompt=ids[-3:], **GREEDY)["choices"][0]["text"]
    long = completion(server, prompt=[1] * 3000, truncate_prompt_tokens=-1, max_tokens=0)  # context: 2048
    assert long["usage"]["prompt_tokens"] == 2048
    bad = post(server, "/v1/completions", prompt="x", truncate_prompt_tokens=0)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "truncate_prompt_tokens"


def test_prompt_logprobs_as_vllm_returns_them(server):
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "It is a truth"}).json()["tokens"]
    r = completion(server, prompt=ids, prompt_logprobs=2, max_tokens=1, temperature=0)
    plp = r["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for token, entry in zip(ids[1:], plp[1:]):
        assert str(token) in entry and 2 <= len(entry) <= 3
        assert all(v["logprob"] <= 0 and v["rank"] >= 1 and isinstance(v["decoded_token"], str) for v in entry.values())
    # the echo path computes the same numbers
    echo = completion(server, prompt=ids, echo=True, logprobs=0, max_tokens=0)["choices"][0]["logprobs"]
    assert [plp[i][str(ids[i])]["logprob"] for i in range(1, len(ids))] == pytest.approx(
        echo["token_logprobs"][1:], abs=1e-5)
    chat = post(server, "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                prompt_logprobs=0).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]


def test_best_of_returns_the_n_most_likely(server):
    kw = dict(prompt="It is a truth", max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    samples = completion(server, n=4, logprobs=0, **kw)["choices"]
    best = completion(server, n=2, best_of=4, logprobs=0, **kw)["choices"]

    def score(c):
        return sum(c["logprobs"]["token_logprobs"])
    ranked = sorted(samples, key=score, reverse=True)[:2]
    assert [c["text"] for c in best] == [c["text"] for c in ranked] and [c["index"] for c in best] == [0, 1]
    plain = completion(server, n=1, best_of=3, **kw)["choices"]
    assert len(plain) == 1 and plain[0]["logprobs"] is None
    for bad in ({"n": 3, "best_of": 2}, {"best_of": 2, "stream": True}):
        r = post(server, "/v1/completions", prompt="x", **bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_chat_echo_prepends_the_last_assistant_message(server):
    msgs = [{"role": "user", "content": "Say"}, {"role": "assistant", "content": "It is"}]
    body = dict(messages=msgs, max_tokens=5, temperature=0, add_generation_prompt=False)
    plain = post(server, "/v1/chat/completions", **body).json()["choices"][0]["message"]["content"]
    echoed = post(server, "/v1/chat/completions", echo=True, **body).json()["choices"][0]["message"]["content"]
    assert echoed == "It is" + plain
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "echo": True, "stream": True}) as r:
        import json
        deltas = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(d["choices"][0]["delta"].get("content") or "" for d in deltas) == echoed


def test_models_retrieve(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0)
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_operator_flags(ckpt, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>")
    proc, url = start(ckpt, "--chat-template", str(template), "--allowed-origins", '["http://example.test"]',
                      "--root-path", "/api", "--log-level", "debug", "--uvicorn-log-level", "warning",
                      "--log-stats-interval", "0.5")
    try:
        ids = httpx.post(f"{url}/tokenize", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}).json()
        assert ids["tokens"] == httpx.post(f"{url}/tokenize", json={"prompt": "<user>hi<assistant>"}).json()["tokens"]
        pre = httpx.options(f"{url}/v1/completions", headers={"Origin": "http://example.test",
                                                              "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://example.test"
        other = httpx.options(f"{url}/v1/completions", headers={"Origin": "http://evil.test",
                                                                "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers
        assert httpx.get(f"{url}/openapi.json").json()["servers"] == [{"url": "/api"}]
        for _ in range(3):
            assert httpx.post(f"{url}/v1/completions", json={"prompt": "It is", "max_tokens": 8}).status_code == 200
        import time
        time.sleep(1.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0
    assert "Avg prompt throughput" in out and "Prefix cache hit rate" in out  # the periodic stats line
    assert "request " in out and "max_tokens=8" in out  # the request log
    assert "POST /v1/completions" not in out  # uvicorn's access log is off at warning


def test_request_log_and_stats_can_be_turned_off(ckpt):
    proc, url = start(ckpt, "--disable-log-requests", "--disable-log-stats", "--log-stats-interval", "0.2")
    try:
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "It is", "max_tokens": 8}).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert "Avg prompt throughput" not in out and "max_tokens=8" not in out


def test_a_bad_chat_template_exits_2(ckpt):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "elas_serve.cli", "serve", "--model", str(ckpt), "--chat-template",
                        "{% for %}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--chat-template does not compile" in r.stderr


def test_serve_help_shows_defaults():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "elas_serve.cli", "serve", "--help"], capture_output=True, text=True,
                         timeout=60).stdout
    for flag, default in (("--port", "8000"), ("--max-num-seqs", "128"), ("--block-size", "16"),
                          ("--max-choices-per-request", "1024"), ("--shutdown-timeout", "30.0")):
        chunk = out.split("options:", 1)[1].split(f"\n  {flag} ", 1)[1].split("\n  --", 1)[0]
        assert f"(default: {default})" in " ".join(chunk.split()), flag
