"""What serving over HTTP costs against offline generation: the same workload both ways, one run.

For each concurrency c: c requests (distinct prompts of --input-len tokens, exactly --output-len
greedy tokens each: `ignore_eos`) start at once and run to the end; a round's output tok/s is
c * output_len over its wall time; each level runs --rounds paired rounds (offline, then HTTP, on
the same prompts) and the median of each and of the per-round ratio is reported.
- offline: `LLM(model).generate(prompts, SamplingParams)` in this process;
- http: `elas-serve serve` as a process, c concurrent streaming `/v1/completions` requests sent by
  an async httpx client in this process (SSE read to `[DONE]`).
While the largest level streams over HTTP, /health is polled every 20 ms and its latency
percentiles are reported (the step loop must not starve the event loop). Both paths serve the same
checkpoint with the same engine flags.

Writes docs/benchmarks/frontend_<device>_<label>.{json,md}; with --label after and an earlier
`before` result next to it, the markdown puts both side by side.

Run: python benchmarks/bench_frontend.py --label before|after [--concurrency 1,16,64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elas_serve import LLM, SamplingParams  # noqa: E402
from elas_serve.utils import DEMO_CHECKPOINT  # noqa: E402

from common import DOCS, environment, serve, write_results  # noqa: E402


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(n)]


def offline_round(llm: LLM, prompts: list[list[int]], output_len: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    assert all(len(r.outputs[0].token_ids) == output_len for r in results)
    return len(prompts) * output_len / wall


async def http_round(url: str, prompts: list[list[int]], output_len: int, probe_health: bool
                     ) -> tuple[float, list[float]]:
    async def one(client: httpx.AsyncClient, prompt: list[int]) -> int:
        body = {"model": "bench", "prompt": prompt, "max_tokens": output_len, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        # NOTE: the client shares the 2 cores with the server: it reads the events as bytes and
        # parses only the last (the usage), so its own cost stays small
        tail = b""
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for data in r.aiter_raw():
                tail = (tail + data)[-4096:]
        events = tail.split(b"\n\n")
        assert events[-1] == b"" and events[-2] == b"data: [DONE]"
        return json.loads(events[-3][6:])["usage"]["completion_tokens"]

    health: list[float] = []
    done = asyncio.Event()

    async def poll(client: httpx.AsyncClient) -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            assert (await client.get("/health")).status_code == 200
            health.append(time.perf_counter() - t0)
            await asyncio.sleep(0.02)

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client, \
            httpx.AsyncClient(base_url=url, timeout=60) as health_client:
        poller = asyncio.create_task(poll(health_client)) if probe_health else None
        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(client, p) for p in prompts))
        wall = time.perf_counter() - start
        done.set()
        if poller:
            await poller
    assert all(t == output_len for t in tokens)
    return len(prompts) * output_len / wall, health


def markdown(data: dict, before: dict | None) -> str:
    env = data["environment"]
    lines = [f"# HTTP serving vs offline generation ({data['label']}, {env['device']})", "",
             f"Demo-sized workload: {data['input_len']} prompt + {data['output_len']} output tokens per request, "
             f"greedy, c requests at once, median of {data['rounds']} rounds; torch {env['torch']}, "
             f"commit {env['commit']}, {env['date']}. Target: HTTP >= 90% of offline at c=64, /health p99 < 50 ms.",
             "", "| c | offline tok/s | HTTP tok/s | HTTP / offline (median of paired rounds) |"
             + (" before: HTTP / offline |" if before else ""), "|---:|---:|---:|---:|" + ("---:|" if before else "")]
    old = {r["concurrency"]: r for r in (before or {}).get("results", [])}
    for r in data["results"]:
        row = f"| {r['concurrency']} | {r['offline_tok_s']:.1f} | {r['http_tok_s']:.1f} | {r['http_over_offline']:.3f} |"
        if before:
            row += f" {old[r['concurrency']]['http_over_offline']:.3f} |" if r["concurrency"] in old else " |"
        lines.append(row)
    h = data["health_ms"]
    lines += ["", f"/health while c={data['health_concurrency']} streams: p50 {h['p50']:.1f} ms, p99 {h['p99']:.1f} ms, "
              f"max {h['max']:.1f} ms over {h['samples']} polls"]
    if before:
        hb = before["health_ms"]
        lines.append(f"(before: p50 {hb['p50']:.1f} ms, p99 {hb['p99']:.1f} ms, max {hb['max']:.1f} ms)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True, help="names the result file, e.g. before / after")
    p.add_argument("--model", type=Path, default=DEMO_CHECKPOINT)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DOCS)
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    engine_args = ["--max-num-seqs", str(max(levels))]
    rounds = {c: [make_prompts(c, args.input_len, vocab, args.seed + 1000 * c + r) for r in range(args.rounds)]
              for c in levels}
    bar = tqdm(total=2 * len(levels) * args.rounds, desc="frontend")
    offline: dict[int, list[float]] = {c: [] for c in levels}
    http: dict[int, list[float]] = {c: [] for c in levels}
    health: list[float] = []
    # NOTE: the server (its own processes, idle meanwhile) and the offline engine are both up, and
    # each round runs offline then over HTTP: paired rounds see the same machine (this VM's speed
    # drifts by tens of percent from minute to minute)
    with serve(["--model", str(args.model), "--served-model-name", "bench", *engine_args],
               Path(tempfile.mkdtemp()) / "server.log") as server:
        url = server.url
        llm = LLM(model=args.model, max_num_seqs=max(levels))
        llm.generate(rounds[levels[0]][0], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        asyncio.run(http_round(url, rounds[levels[0]][0][:1], 4, False))
        for c in levels:
            for prompts in rounds[c]:
                offline[c].append(offline_round(llm, prompts, args.output_len))
                tok_s, h = asyncio.run(http_round(url, prompts, args.output_len, c == max(levels)))
                http[c].append(tok_s)
                health += h
                bar.update(2)
    bar.close()
    results = [{"concurrency": c, "offline_tok_s": statistics.median(offline[c]),
                "http_tok_s": statistics.median(http[c]),
                "http_over_offline": statistics.median(h / o for h, o in zip(http[c], offline[c])),
                "offline_rounds": offline[c], "http_rounds": http[c]} for c in levels]
    ms = np.array(health) * 1e3
    data = {"label": args.label, "environment": environment(torch.device("cpu")), "model": str(args.model),
            "input_len": args.input_len, "output_len": args.output_len, "rounds": args.rounds,
            "engine_args": engine_args, "results": results, "health_concurrency": max(levels),
            "health_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                          "max": float(ms.max()), "samples": int(ms.size)}}
    stem = f"frontend_{data['environment']['device_type']}"
    before_path = args.out / f"{stem}_before.json"
    before = json.loads(before_path.read_text()) if args.label != "before" and before_path.exists() else None
    path = write_results(f"{stem}_{args.label}", data, markdown(data, before), args.out)
    print(markdown(data, before))
    print(f"results: {path} (+ .md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
