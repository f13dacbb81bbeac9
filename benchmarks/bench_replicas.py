"""Prefix affinity across engine replicas on Ray Serve: prefix-cache hit rate, prefix-aware vs
round-robin routing, on a workload of shared system prompts.

For each routing policy, `elas-serve serve --replicas R --routing P` is started; then --systems
distinct long system prompts each get --questions short questions, sent in a shuffled order with
--concurrency requests in flight. The hit rate is what the responses report: the sum of
`usage.prompt_tokens_details.cached_tokens` over the sum of `usage.prompt_tokens`. Output tok/s and
latency percentiles come from the same run. Writes docs/benchmarks/replicas_<device>.{json,md}.

Run: python benchmarks/bench_replicas.py [--replicas 2] [--systems 16] [--questions 4]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, environment, serve, write_results  # noqa: E402

WORDS = ("careful helpful assistant answers questions about the novels of Jane Austen with quotations and dates "
         "and never invents a character").split()


def workload(systems: int, questions: int, system_words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for s in range(systems):
        system = f"System {s}: " + " ".join(rng.choice(WORDS) for _ in range(system_words))
        prompts += [f"{system}\nQuestion {q}: who is {rng.choice(WORDS)}?\nAnswer:" for q in range(questions)]
    rng.shuffle(prompts)
    return prompts


async def run_load(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> list[dict]:
    sem = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, prompt: str) -> dict:
        async with sem:
            t0 = time.perf_counter()
            r = await client.post("/v1/completions", json={"model": "bench", "prompt": prompt, "max_tokens": max_tokens,
                                                           "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            return {"latency_s": time.perf_counter() - t0, **r.json()["usage"]}

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        return await asyncio.gather(*(one(client, p) for p in prompts))


def markdown(data: dict) -> str:
    env = data["environment"]
    lines = [f"# Prefix affinity across {data['replicas']} engine replicas ({env['device']})", "",
             f"{data['systems']} shared system prompts x {data['questions']} questions ({data['num_requests']} "
             f"requests, {data['max_tokens']} output tokens each, {data['concurrency']} in flight), demo checkpoint "
             f"on Ray Serve; torch {env['torch']}, commit {env['commit']}, {env['date']}.", "",
             "| routing | prefix-cache hit rate | output tok/s | p50 latency (ms) | p99 latency (ms) |",
             "|---|---:|---:|---:|---:|"]
    for r in data["results"]:
        lines.append(f"| {r['routing']} | {r['hit_rate']:.3f} | {r['output_tok_s']:.1f} | {r['p50_ms']:.0f} | "
                     f"{r['p99_ms']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--replica-cpus", type=float, default=0.5)
    p.add_argument("--systems", type=int, default=16)
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--system-words", type=int, default=120)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--model", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DOCS)
    args = p.parse_args(argv)
    prompts = workload(args.systems, args.questions, args.system_words, args.seed)
    results = []
    for routing in ("prefix", "round_robin"):
        server_args = ["--served-model-name", "bench", "--replicas", str(args.replicas), "--routing", routing,
                       "--replica-cpus", str(args.replica_cpus), "--disable-log-requests",
                       *(["--model", args.model] if args.model else [])]
        with serve(server_args, Path(tempfile.mkdtemp()) / "server.log") as server:
            t0 = time.perf_counter()
            usages = asyncio.run(run_load(server.url, prompts, args.concurrency, args.max_tokens))
            wall = time.perf_counter() - t0
        lat = np.array([u["latency_s"] for u in usages]) * 1e3
        hit = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages) / sum(u["prompt_tokens"] for u in usages)
        results.append({"routing": routing, "hit_rate": hit, "wall_s": wall,
                        "output_tok_s": sum(u["completion_tokens"] for u in usages) / wall,
                        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                        "requests": usages})
        print(f"{routing}: prefix-cache hit rate {hit:.3f}, {results[-1]['output_tok_s']:.1f} output tok/s", flush=True)
    data = {"environment": environment(torch.device("cpu")), "replicas": args.replicas, "systems": args.systems,
            "questions": args.questions, "num_requests": len(prompts), "max_tokens": args.max_tokens,
            "concurrency": args.concurrency, "results": results}
    path = write_results(f"replicas_{data['environment']['device_type']}", data, markdown(data), args.out)
    print(markdown(data))
    print(f"results: {path} (+ .md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
