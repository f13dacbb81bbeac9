"""The server under abuse, as a real process: bursts far over the queue limit, a storm of streams
dropped at random points, SIGTERM with requests in flight. Every request gets exactly one complete
answer (or a 503 with Retry-After), and afterwards nothing runs, no KV block is held, memory is
bounded and service is normal.

Run: python -m pytest tests/test_overload.py -v -s
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
from pathlib import Path

import httpx
import pytest

from authors_ckpt import Variant, write_checkpoint
from server_utils import parse_metrics, start

LABEL = 'model_name="m"'


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_file):
    path = tmp_path_factory.mktemp("overload_ckpt")
    write_checkpoint(path, Variant("overload", vocab=320, extra_config={"eos_token_id": 0}))
    shutil.copy(tokenizer_file, path / "tokenizer.json")
    return path


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def one_request(client: httpx.AsyncClient, i: int, stream: bool, max_tokens: int) -> dict:
    """Send one completion; return what came back, checked to be one whole answer."""
    body = {"model": "m", "prompt": f"request {i}", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if not stream:
        r = await client.post("/v1/completions", json=body)
        if r.status_code == 503:
            return {"status": 503, "retry_after": r.headers.get("retry-after")}
        data = r.json()
        assert r.status_code == 200 and data["choices"][0]["finish_reason"] == "length", r.text
        assert data["usage"]["completion_tokens"] == max_tokens
        return {"status": 200, "id": data["id"]}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code == 503:
            await r.aread()
            return {"status": 503, "retry_after": r.headers.get("retry-after")}
        assert r.status_code == 200
        events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]", events[-3:]
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finishes == ["length"] and len({c["id"] for c in chunks}) == 1
    return {"status": 200, "id": chunks[0]["id"]}


def gauges(url: str) -> tuple[float, float, float]:
    m = parse_metrics(httpx.get(f"{url}/metrics").text)
    return (m[f"elas:num_requests_running{{{LABEL}}}"], m[f"elas:num_requests_waiting{{{LABEL}}}"],
            m[f"elas:kv_cache_usage_perc{{{LABEL}}}"])


async def settle(url: str, timeout: float = 10) -> tuple[float, float, float]:
    for _ in range(int(timeout / 0.05)):
        if gauges(url) == (0, 0, 0):
            break
        await asyncio.sleep(0.05)
    return gauges(url)


def test_bursts_over_the_queue_limit_lose_nothing(ckpt):
    proc, url = start(ckpt, "--max-queued-requests", "4", "--max-num-seqs", "4")
    try:
        async def main() -> list[dict]:
            results = []
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                for burst in range(3):
                    results += await asyncio.gather(*(one_request(client, 100 * burst + i, i % 2 == 0, 8)
                                                      for i in range(100)))
                assert await settle(url) == (0, 0, 0)
            return results

        before = parse_metrics(httpx.get(f"{url}/metrics").text)
        results = asyncio.run(main())
        ok = [r for r in results if r["status"] == 200]
        refused = [r for r in results if r["status"] == 503]
        print(f"\noverload: sent {len(results)}, 200: {len(ok)}, 503: {len(refused)}, lost: "
              f"{len(results) - len(ok) - len(refused)}")
        assert len(ok) + len(refused) == len(results) == 300 and ok and refused
        assert all(r["retry_after"] for r in refused)
        assert len({r["id"] for r in ok}) == len(ok)  # nothing answered twice
        after = parse_metrics(httpx.get(f"{url}/metrics").text)
        key = f'elas:request_success_total{{finished_reason="length",{LABEL}}}'
        assert after[key] - before.get(key, 0) == len(ok)  # the engine finished exactly those
        r = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "It is", "max_tokens": 3})
        assert r.status_code == 200  # normal service after
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_a_storm_of_dropped_streams_leaks_nothing(ckpt):
    proc, url = start(ckpt)
    rng = random.Random(0)
    try:
        async def drop_after(client: httpx.AsyncClient, i: int, chunks: int) -> int:
            body = {"model": "m", "prompt": f"storm {i}", "max_tokens": 400, "ignore_eos": True, "stream": True}
            seen = 0
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        seen += 1
                        if seen >= chunks:
                            break  # NOTE: leaving the block closes the connection mid-stream
            return seen

        async def storm(n: int) -> list[int]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                return await asyncio.gather(*(drop_after(client, i, rng.randint(1, 40)) for i in range(n)))

        asyncio.run(storm(50))  # warm-up: allocator, caches
        assert asyncio.run(settle(url)) == (0, 0, 0)
        rss_before = rss_bytes(proc.pid)
        seen = asyncio.run(storm(200))
        left = asyncio.run(settle(url))
        rss_after = rss_bytes(proc.pid)
        m = parse_metrics(httpx.get(f"{url}/metrics").text)
        aborted = m[f'elas:request_success_total{{finished_reason="abort",{LABEL}}}']
        print(f"\nstorm: dropped 200 streams after {min(seen)}-{max(seen)} chunks; running/waiting/KV after: "
              f"{left}; aborted {aborted:.0f} of 250; RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB")
        assert left == (0, 0, 0) and aborted == 250
        assert rss_after - rss_before < 64 << 20
        r = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "It is", "max_tokens": 3})
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_sigterm_under_load_drains_and_exits_0(ckpt):
    proc, url = start(ckpt, "--max-num-seqs", "8")
    try:
        async def main() -> tuple[list[dict], int]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                work = [asyncio.create_task(one_request(client, i, i % 2 == 0, 60)) for i in range(16)]
                while gauges(url)[0] < 8:  # a full running batch, the rest waiting
                    await asyncio.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.1)
                late = await client.post("/v1/completions", json={"model": "m", "prompt": "x"})
                return await asyncio.gather(*work), late.status_code

        results, late = asyncio.run(main())
        assert late == 503
        assert [r["status"] for r in results] == [200] * 16  # every in-flight request completed
        assert proc.wait(60) == 0
    finally:
        proc.kill()
