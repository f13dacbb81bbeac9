"""elas-serve on Ray Serve, on the CPU: a local Ray cluster, 2 engine replicas of a small model
behind the ingress (`elas-serve serve --replicas 2` as a real process). The openai client's
completions and streams go through the ingress, both replicas serve, prefix affinity keeps shared
prompts on one replica, and a replica killed mid-load loses no request silently.

Skipped with a reason when Ray Serve cannot be imported. Run: python -m pytest tests/test_ray_serve.py -v -s
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time

import httpx
import openai
import pytest

from authors_ckpt import Variant, write_checkpoint
from server_utils import parse_metrics, start

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'elas-serve[ray]')")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'elas-serve[ray]')")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_file):
    path = tmp_path_factory.mktemp("ray_ckpt")
    write_checkpoint(path, Variant("ray", vocab=320, extra_config={"eos_token_id": 0}))
    shutil.copy(tokenizer_file, path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def cluster(ckpt):
    proc, url = start(ckpt, "--replicas", "2", "--replica-cpus", "0.5", "--num-kv-blocks", "256", timeout=300)
    try:
        yield proc, url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def served_by(url: str) -> dict[str, float]:
    """Prompts each replica has served, from the ingress's /metrics."""
    return {k.split('replica="')[1].split('"')[0]: v for k, v in parse_metrics(httpx.get(f"{url}/metrics").text).items()
            if k.startswith("elas:replica_requests_total")}


def test_completions_and_streams_through_the_ingress(cluster):
    _, url = cluster
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
    r = client.completions.create(model="m", prompt="It is a truth", max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    chunks = list(client.completions.create(model="m", prompt="It is a truth", max_tokens=6, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.choices[0].message.role == "assistant"
    assert [m.id for m in client.models.list().data] == ["m"]
    bad = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def test_both_replicas_serve_and_shared_prefixes_stay_together(cluster):
    _, url = cluster
    before = served_by(url)

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            body = {"model": "m", "max_tokens": 4, "temperature": 0}
            # distinct prompts at once: load spreads them
            await asyncio.gather(*(c.post("/v1/completions", json={**body, "prompt": f"{i} " * 40})
                                   for i in range(16)))
            # one long shared system prompt, sent one at a time: affinity keeps it on one replica
            system = "You are a careful assistant. " * 12
            usages = []
            for i in range(6):
                r = await c.post("/v1/completions", json={**body, "prompt": system + f"Question {i}?"})
                usages.append(r.json()["usage"])
            return usages

    usages = asyncio.run(main())
    after = served_by(url)
    delta = {k: v - before.get(k, 0) for k, v in after.items()}
    assert len([v for v in delta.values() if v > 0]) == 2, delta  # both replicas received traffic
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usages]
    assert all(c >= 64 for c in cached[1:]), cached  # every repeat hit the replica holding the prefix


def test_a_killed_replica_loses_no_request_silently(cluster):
    proc, url = cluster
    results: list = []

    async def one(c: httpx.AsyncClient, i: int, stream: bool) -> str:
        body = {"model": "m", "prompt": f"load {i} " * 8, "max_tokens": 64, "ignore_eos": True, "stream": stream}
        if not stream:
            r = await c.post("/v1/completions", json=body)
            return "ok" if r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 64 else (
                f"error {r.status_code}" if "error" in r.json() else "silent")
        async with c.stream("POST", "/v1/completions", json=body) as r:
            events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        payloads = [json.loads(e[6:]) for e in events[:-1]]
        if events[-1] != "data: [DONE]":
            return "silent"
        if any("error" in p for p in payloads):
            return "error event"
        done = [p for p in payloads if p["choices"] and p["choices"][0]["finish_reason"] == "length"]
        return "ok" if done else "silent"

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=300) as c:
            work = [asyncio.create_task(one(c, i, i % 2 == 0)) for i in range(24)]
            await asyncio.sleep(1.0)
            victim = replica_pid()
            subprocess.run(["kill", "-9", str(victim)], check=True)
            results.extend(await asyncio.gather(*work))

    asyncio.run(main())
    print(f"\nkilled one replica under load: {results.count('ok')} ok, "
          f"{len(results) - results.count('ok') - results.count('silent')} clean errors, "
          f"{results.count('silent')} lost")
    assert "silent" not in results and results.count("ok") > 0
    deadline = time.monotonic() + 120  # Ray Serve replaces the replica; service goes on
    while time.monotonic() < deadline:
        r = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "It is", "max_tokens": 2}, timeout=60)
        if r.status_code == 200:
            break
        time.sleep(1)
    assert r.status_code == 200


def replica_pid() -> int:
    """The process of one engine replica (a Ray actor named for the deployment)."""
    out = subprocess.run(["pgrep", "-f", "ray::ServeReplica:elas-serve:EngineReplica"], capture_output=True,
                         text=True).stdout.split()
    assert out, "no engine replica process found"
    return int(out[0])
