"""The HTTP API against a real uvicorn server on loopback, with the official `openai` client in
strict response-validation mode, raw HTTP where the wire format itself is the contract.

Run: python -m pytest tests/test_server.py -v
"""

from __future__ import annotations

import json
import shutil
import time

import httpx
import openai
import pytest

from authors_ckpt import Variant, write_checkpoint
from server_utils import MODEL_NAME, ServerThread

VOCAB = 320


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_file):
    path = tmp_path_factory.mktemp("server_ckpt")
    write_checkpoint(path, Variant("server", vocab=VOCAB, extra_config={"eos_token_id": 0}))
    shutil.copy(tokenizer_file, path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    with ServerThread(ckpt, block_size=4, step_delay=0.002) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         _strict_response_validation=True)


@pytest.fixture(scope="module")
def stream_client(server):
    """NOTE: not strict: openai's `Completion` type, which it also uses for stream chunks, types
    `finish_reason` as a non-null literal, yet every chunk but a choice's last carries null (as
    OpenAI's own API sends it). Everything else is validated by `client`."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def complete(client, **kw):
    return client.completions.create(model=MODEL_NAME, **kw)


def test_models_health_version(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].model_extra["max_model_len"] == 2048
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_tokenize_detokenize_tokenizer_info(server):
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "It is a truth", "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) == len(r["token_strs"]) and r["max_model_len"] == 2048
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "It is a truth"}
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 0
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>"
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [VOCAB]})
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]


def test_prompt_shapes_and_flattened_choices(server, client):
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "It is a truth"}).json()["tokens"]
    greedy = dict(max_tokens=6, temperature=0)
    text = complete(client, prompt="It is a truth", **greedy).choices[0].text
    assert complete(client, prompt=ids, **greedy).choices[0].text == text
    many = complete(client, prompt=["It is a truth", "a single man"], n=2, **greedy)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == text
    ids_many = complete(client, prompt=[ids, ids[:2]], **greedy)
    assert ids_many.choices[0].text == text and len(ids_many.choices) == 2
    assert many.usage.prompt_tokens == len(ids) + len(httpx.post(
        f"{server.url}/tokenize", json={"prompt": "a single man"}).json()["tokens"])
    assert many.usage.completion_tokens == 4 * 6 and many.choices[0].finish_reason == "length"


def test_seed_and_ignore_eos(client):
    kw = dict(prompt="It is", max_tokens=10, temperature=1.0, seed=11)
    a, b = complete(client, **kw), complete(client, **kw)
    assert a.choices[0].text == b.choices[0].text
    forced = complete(client, prompt="It is", max_tokens=5, temperature=0, logit_bias={"0": 100},
                      extra_body={"ignore_eos": True})
    assert forced.usage.completion_tokens == 5 and forced.choices[0].finish_reason == "length"
    stops = complete(client, prompt="It is", max_tokens=5, temperature=0, logit_bias={"0": 100})
    assert stops.usage.completion_tokens == 1 and stops.choices[0].finish_reason == "stop"


def _post(server, **body) -> dict:
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL_NAME, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_logprobs_for_lm_eval_loglikelihood(server):
    """lm-eval's payload: token-id prompts, echo, logprobs=1, max_tokens 1 (or 0), temperature 0.

    NOTE: raw HTTP here: the openai client's strict types say `token_logprobs: List[float]`, but
    the first entry is null with echo (as vLLM does and lm-eval expects)."""
    ctx = httpx.post(f"{server.url}/tokenize", json={"prompt": "It is a truth universally"}).json()["tokens"]
    for max_tokens in (1, 0):
        r = _post(server, prompt=[ctx], echo=True, logprobs=1, max_tokens=max_tokens, temperature=0, seed=1234)
        lp = r["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(ctx) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
        assert all(len(t) >= 1 for t in lp["top_logprobs"][1:])
        assert r["choices"][0]["text"].startswith("It is a truth universally")
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
        assert r["usage"]["completion_tokens"] == max_tokens
    # is_greedy: the greedy continuation's logprob is the max of its top_logprobs entry
    last = _post(server, prompt=[ctx], echo=True, logprobs=1, max_tokens=1, temperature=0)["choices"][0]["logprobs"]
    assert last["token_logprobs"][-1] == pytest.approx(max(last["top_logprobs"][-1].values()))


def test_return_tokens_as_token_ids(server):
    r = _post(server, prompt=[5, 6, 7], echo=True, logprobs=0, max_tokens=2, temperature=0,
              return_tokens_as_token_ids=True)
    assert r["choices"][0]["logprobs"]["tokens"][:3] == ["token_id:5", "token_id:6", "token_id:7"]


def test_stop_strings_and_token_ids(client):
    full = complete(client, prompt="It is a truth", max_tokens=16, temperature=0,
                    extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True}, logprobs=0)
    ids = [int(t.split(":")[1]) for t in full.choices[0].logprobs.tokens]
    r = complete(client, prompt="It is a truth", max_tokens=16, temperature=0,
                 extra_body={"ignore_eos": True, "stop_token_ids": [ids[2]]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == ids.index(ids[2]) + 1
    assert r.choices[0].model_extra["stop_reason"] == ids[2]
    text = full.choices[0].text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text.find(text[i:i + 2]) == i
                and "\ufffd" not in text[i - 1:i + 3])
    r = complete(client, prompt="It is a truth", max_tokens=16, temperature=0, stop=[stop, "zzzz"],
                 extra_body={"ignore_eos": True})
    assert r.choices[0].text == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"
    assert complete(client, prompt="It is", max_tokens=3, stop=None).choices  # stop: null is accepted


def _stream(client, **kw):
    chunks = list(client.completions.create(model=MODEL_NAME, stream=True, **kw))
    texts, finishes = {}, {}
    for c in chunks[:-1]:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.finish_reason is not None:
                finishes[ch.index] = finishes.get(ch.index, 0) + 1
    return chunks, texts, finishes


def test_streaming_equals_non_streaming(client, stream_client):
    kw = dict(prompt=["It is a truth", "Café 東京"], n=2, max_tokens=12, temperature=0, echo=True)
    whole = complete(client, **kw)
    chunks, texts, finishes = _stream(stream_client, stream_options={"include_usage": True}, **kw)
    assert texts == {c.index: c.text for c in whole.choices}
    assert finishes == {0: 1, 1: 1, 2: 1, 3: 1}  # exactly one finish chunk per choice
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format(server):
    body = {"model": MODEL_NAME, "prompt": "It is", "max_tokens": 3, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes())
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    payloads = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    for event, payload in zip(events, payloads):
        assert event.startswith(b"data: {") and b"\n" not in event
        assert event == b"data: " + json.dumps(payload, ensure_ascii=False).encode()  # canonical bytes
        assert list(payload)[:4] == ["id", "object", "created", "model"] and payload["object"] == "text_completion"
    assert len({p["id"] for p in payloads}) == 1
    assert [len(p["choices"]) for p in payloads] == [1] * (len(payloads) - 1) + [0]
    assert payloads[-1]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("payload,status,param,fragment", [
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "at least 0"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature", ">= 0"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs", "between 0 and 20"),
    ({"prompt": "x", "n": 0}, 400, "n", "at least 1"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": []}, 400, "prompt", "empty"),
    ({"prompt": [[1, 2], []]}, 400, "prompt", "prompt 1: the prompt is empty"),
    ({"prompt": [1, VOCAB]}, 400, "prompt", "outside the vocabulary"),
    ({"prompt": [1, -3]}, 400, "prompt", "outside the vocabulary"),
    ({"prompt": 123}, 400, "prompt", "prompt"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens", "integer"),
    ({"prompt": "x", "stream": "yes please"}, 400, "stream", "boolean"),
    ({"prompt": "x", "stop": [""]}, 400, "stop", "non-empty"),
    ({"prompt": "x", "logit_bias": {"a": 1}}, 400, "logit_bias", "token ids"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    ({"prompt": "x", "min_tokens": 5, "max_tokens": 2}, 400, "min_tokens", "<= max_tokens"),
    ({"max_tokens": 3}, 400, "prompt", "Field required"),
    ({"prompt": "x", "model": "gpt-4"}, 404, None, "gpt-4"),
])
def test_bad_requests_get_openai_errors(server, payload, status, param, fragment):
    r = httpx.post(f"{server.url}/v1/completions", json=payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert err["param"] == param and fragment in err["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200  # and the server is fine


def test_error_classes_in_the_openai_client(client):
    with pytest.raises(openai.BadRequestError):
        complete(client, prompt="x", logprobs=25)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length is 2048 tokens.*contains 2049"):
        complete(client, prompt=[1] * 2049)


def test_malformed_json_oversized_body_and_routes(server):
    r = httpx.post(f"{server.url}/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x" * (2 << 20)})
    assert r.status_code == 413 and r.json()["error"]["type"] == "RequestTooLargeError"
    r = httpx.get(f"{server.url}/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"] == "No route /v2/nothing"
    r = httpx.get(f"{server.url}/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_client_disconnect_mid_stream_frees_every_block(server):
    body = {"model": MODEL_NAME, "prompt": "It is", "max_tokens": 1500, "temperature": 0, "stream": True,
            "ignore_eos": True}
    before = server.metrics()
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.llm.stats.kv_cache_usage > 0
    assert server.wait_idle(5), "the request kept running after the client left"
    after = server.metrics()
    key = f'elas:request_success_total{{finished_reason="abort",model_name="{MODEL_NAME}"}}'
    assert after[key] - before.get(key, 0) == 1
    assert after[f'elas:kv_cache_usage_perc{{model_name="{MODEL_NAME}"}}'] == 0


def test_client_disconnect_non_streaming_aborts(server):
    body = {"model": MODEL_NAME, "prompt": "It is", "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    start = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.3)
    assert server.wait_idle(5)
    assert time.monotonic() - start < 5


def _counters(server) -> dict[str, float]:
    m = server.metrics()
    label = f'model_name="{MODEL_NAME}"'
    return {"prompt": m[f"elas:prompt_tokens_total{{{label}}}"],
            "gen": m[f"elas:generation_tokens_total{{{label}}}"],
            "length": m.get(f'elas:request_success_total{{finished_reason="length",{label}}}', 0),
            "ttft": m[f"elas:time_to_first_token_seconds_count{{{label}}}"],
            "e2e": m[f"elas:e2e_request_latency_seconds_count{{{label}}}"]}


def test_metric_counters_move_by_exactly_what_was_served(server, client, stream_client):
    assert server.wait_idle(5)
    before = _counters(server)
    r1 = complete(client, prompt=["It is a truth", "a single man in possession"], max_tokens=7, temperature=0,
                  extra_body={"ignore_eos": True})
    r2 = list(stream_client.completions.create(model=MODEL_NAME, prompt="Café", max_tokens=5, stream=True,
                                        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    after = _counters(server)
    assert after["prompt"] - before["prompt"] == r1.usage.prompt_tokens + r2[-1].usage.prompt_tokens
    assert after["gen"] - before["gen"] == r1.usage.completion_tokens + r2[-1].usage.completion_tokens == 19
    assert after["length"] - before["length"] == 3
    assert after["ttft"] - before["ttft"] == 3 and after["e2e"] - before["e2e"] == 3


def test_metric_families_and_buckets(server):
    text = httpx.get(f"{server.url}/metrics").text
    for family in ("elas:num_requests_running", "elas:num_requests_waiting", "elas:kv_cache_usage_perc",
                   "elas:prompt_tokens_total", "elas:generation_tokens_total", "elas:request_success_total",
                   "elas:num_preemptions_total", "elas:prefix_cache_queries_total", "elas:prefix_cache_hits_total",
                   "elas:time_to_first_token_seconds", "elas:inter_token_latency_seconds",
                   "elas:e2e_request_latency_seconds", "elas:request_queue_time_seconds",
                   "elas:request_prefill_time_seconds", "elas:request_decode_time_seconds",
                   "elas:ffn_backend_info", "elas:ffn_activation_density", "elas:step_seconds"):
        assert f"\n{family}" in text, family
    assert f'elas:ffn_backend_info{{backend="dense",model_name="{MODEL_NAME}"}} 1.0' in text
    for hist in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
        first_bucket = float(text.split(f"elas:{hist}_seconds_bucket{{le=\"")[1].split('"')[0])
        assert first_bucket <= 0.001
    density = server.metrics()[f'elas:ffn_activation_density{{model_name="{MODEL_NAME}"}}']
    assert 0 < density < 1
    assert 'elas:step_seconds_count{model_name="elas-test",phase="forward"}' in text


def test_chat_completions(server, client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Emma?"}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=2)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and r.usage.completion_tokens == len(choice.logprobs.content)
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    ids = httpx.post(f"{server.url}/tokenize", json={"messages": msgs}).json()["tokens"]
    assert r.usage.prompt_tokens == len(ids)
    text = complete(client, prompt=ids, max_tokens=6, temperature=0).choices[0].text
    assert choice.message.content == text
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=6, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=[], max_tokens=2)


def test_queue_full_gives_503_at_once(ckpt):
    with ServerThread(ckpt, max_queued_requests=1, max_num_seqs=1, step_delay=0.005) as s:
        body = {"model": MODEL_NAME, "prompt": "It is", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body) as running:
            lines = running.iter_lines()  # NOTE: keep the iterator: dropping it closes the stream
            next(lines)  # admitted and running
            with httpx.stream("POST", f"{s.url}/v1/completions", json=body) as queued:
                for _ in range(100):
                    if s.llm.num_queued == 1:
                        break
                    time.sleep(0.01)
                start = time.monotonic()
                r = httpx.post(f"{s.url}/v1/completions", json={**body, "stream": False})
                assert r.status_code == 503 and time.monotonic() - start < 1
                assert r.json()["error"]["type"] == "ServiceUnavailableError" and "queue is full" in r.text
                assert r.headers["retry-after"]
                del queued
        assert s.wait_idle(5)


def test_api_key(ckpt):
    with ServerThread(ckpt, api_key="sekret") as s:
        assert httpx.get(f"{s.url}/v1/models").status_code == 401
        assert httpx.get(f"{s.url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{s.url}/health").status_code == 200 and httpx.get(f"{s.url}/metrics").status_code == 200
        good = openai.OpenAI(base_url=f"{s.url}/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model=MODEL_NAME, prompt="x", max_tokens=1).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="bad", max_retries=0).models.list()
