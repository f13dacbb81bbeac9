"""Soak test: a server under a steady mixed load for a long time; does anything leak or drift?

Starts `elas-serve serve` (the bundled demo by default; or give --url), then runs --concurrency
workers for --duration seconds. Each worker loops over a mix of what real clients send: plain and
streamed completions read to the end, streams dropped part-way, chat completions, /tokenize, and
bad requests (which must get a 400). Every --interval seconds it samples the server's RSS, its KV
cache usage and request gauges (from /metrics), and the latency percentiles of the requests that
finished in that window. Any response that is not the expected one (a 5xx, a 400 for a good
request, a truncated stream) is counted as an error.

Writes docs/benchmarks/soak_<device>.{json,md,png} (or --out DIR). The summary says how much RSS
grew from the first window after warm-up to the last, and how median latency drifted.

Run: python benchmarks/soak.py --duration 600 [--concurrency 8] [--interval 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, environment, serve, write_results  # noqa: E402

WORDS = ("It is a truth universally acknowledged that a single man in possession of a good fortune must "
         "be in want of a wife Emma Woodhouse handsome clever and rich").split()
MIX = (("complete", 3), ("stream", 3), ("drop", 2), ("chat", 1), ("tokenize", 1), ("bad", 1))


class Workload:
    """One worker's requests; each returns (kind, latency seconds, ok)."""

    def __init__(self, client: httpx.AsyncClient, model: str, rng: random.Random):
        self.client, self.model, self.rng = client, model, rng

    def prompt(self) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(4, 120)))

    async def run(self, kind: str) -> bool:
        body = {"model": self.model, "prompt": self.prompt(), "max_tokens": self.rng.randint(8, 64),
                "temperature": self.rng.choice([0, 0.8]), "seed": self.rng.randint(0, 1 << 30)}
        if kind == "complete":
            r = await self.client.post("/v1/completions", json=body)
            return r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        if kind in ("stream", "drop"):
            keep = self.rng.randint(1, 8) if kind == "drop" else None
            async with self.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    return False
                events = []
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        if keep is not None and len(events) >= keep:
                            return True  # NOTE: leaving closes the connection: the server aborts
            return events[-1] == "data: [DONE]" and "finish_reason" in events[-2]
        if kind == "chat":
            msgs = [{"role": "user", "content": body["prompt"]}]
            r = await self.client.post("/v1/chat/completions", json={"model": self.model, "messages": msgs,
                                                                     "max_tokens": body["max_tokens"]})
            return r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
        if kind == "tokenize":
            r = await self.client.post("/tokenize", json={"prompt": body["prompt"]})
            return r.status_code == 200 and r.json()["count"] > 0
        bad = self.rng.choice([{**body, "max_tokens": -1}, {**body, "logit_bias": {"99999999": 1}},
                               {**body, "prompt": [True]}, {**body, "n": 0}])
        r = await self.client.post("/v1/completions", json=bad)
        return r.status_code == 400 and "error" in r.json()


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def gauge(text: str, name: str) -> float:
    line = next(ln for ln in text.splitlines() if ln.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


async def soak(url: str, pid: int | None, args: argparse.Namespace) -> list[dict]:
    kinds = [k for k, w in MIX for _ in range(w)]
    done: list[tuple[float, str, float, bool]] = []  # (finish time, kind, latency, ok)
    stop = time.monotonic() + args.duration

    async def worker(i: int) -> None:
        rng = random.Random(args.seed * 1000 + i)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            load = Workload(client, args.served_model_name, rng)
            while time.monotonic() < stop:
                kind = rng.choice(kinds)
                t0 = time.monotonic()
                try:
                    ok = await load.run(kind)
                except (httpx.HTTPError, KeyError, ValueError, IndexError):
                    ok = False
                done.append((time.monotonic(), kind, time.monotonic() - t0, ok))

    windows = []

    async def sampler() -> None:
        start = last = time.monotonic()
        with tqdm(total=int(args.duration), desc="soak", unit="s") as bar:
            while last < stop:
                await asyncio.sleep(min(args.interval, max(stop - last, 0.01)))
                now = time.monotonic()
                batch = [d for d in done if last <= d[0] < now]
                async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                    text = (await client.get("/metrics")).text
                lat = np.array([d[2] for d in batch if d[3]]) * 1e3
                windows.append({
                    "t_s": round(now - start, 2), "requests": len(batch),
                    "errors": sum(1 for d in batch if not d[3]), "rss_mib": rss_mib(pid),
                    "kv_cache_usage": gauge(text, "elas:kv_cache_usage_perc"),
                    "running": gauge(text, "elas:num_requests_running"),
                    "waiting": gauge(text, "elas:num_requests_waiting"),
                    **({f"p{q}_ms": float(np.percentile(lat, q)) for q in (50, 90, 99)} if lat.size else {})})
                bar.update(int(now - start) - bar.n)
                last = now

    await asyncio.gather(sampler(), *(worker(i) for i in range(args.concurrency)))
    return windows


def summarize(windows: list[dict], warmup: int) -> dict:
    steady = windows[warmup:] or windows
    first, last = steady[0], steady[-1]
    out = {"requests": sum(w["requests"] for w in windows), "errors": sum(w["errors"] for w in windows),
           "windows": len(windows), "warmup_windows": warmup}
    if first["rss_mib"] is not None:
        out |= {"rss_first_mib": first["rss_mib"], "rss_last_mib": last["rss_mib"],
                "rss_max_mib": max(w["rss_mib"] for w in steady),
                "rss_growth_mib": last["rss_mib"] - first["rss_mib"]}
    p50 = [w["p50_ms"] for w in steady if "p50_ms" in w]
    if len(p50) >= 2:
        half = len(p50) // 2
        out |= {"p50_first_half_ms": float(np.median(p50[:half])), "p50_second_half_ms": float(np.median(p50[half:])),
                "p50_drift": float(np.median(p50[half:]) / np.median(p50[:half]))}
    out["kv_cache_usage_max"] = max(w["kv_cache_usage"] for w in windows)
    return out


def markdown(data: dict) -> str:
    s, env = data["summary"], data["environment"]
    lines = [f"# Soak test ({env['device']})", "",
             f"`{data['command']}`: {data['duration_s']} s, {data['concurrency']} workers, mixed load "
             f"({', '.join(k for k, _ in MIX)}), torch {env['torch']}, commit {env['commit']}, {env['date']}.", "",
             f"- requests: {s['requests']}, unexpected responses: {s['errors']}"]
    if "rss_growth_mib" in s:
        lines.append(f"- server RSS after warm-up: {s['rss_first_mib']:.1f} MiB -> {s['rss_last_mib']:.1f} MiB "
                     f"(growth {s['rss_growth_mib']:+.1f} MiB, max {s['rss_max_mib']:.1f} MiB)")
    if "p50_drift" in s:
        lines.append(f"- median latency, first vs second half of the windows: {s['p50_first_half_ms']:.1f} ms vs "
                     f"{s['p50_second_half_ms']:.1f} ms (x{s['p50_drift']:.3f})")
    lines += [f"- KV cache usage peaked at {s['kv_cache_usage_max']:.3f} and every window's gauges are in the JSON",
              "", "| t (s) | requests | errors | RSS (MiB) | KV usage | p50 (ms) | p90 (ms) | p99 (ms) |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for w in data["windows"]:
        lines.append(f"| {w['t_s']:.0f} | {w['requests']} | {w['errors']} | {w['rss_mib'] or 0:.1f} | "
                     f"{w['kv_cache_usage']:.3f} | {w.get('p50_ms', 0):.1f} | {w.get('p90_ms', 0):.1f} | "
                     f"{w.get('p99_ms', 0):.1f} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'elas-serve[loadtest]')")
        return False
    w = data["windows"]
    t = [x["t_s"] for x in w]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    axes[0].plot(t, [x["rss_mib"] or 0 for x in w])
    axes[0].set_ylabel("server RSS (MiB)")
    axes[1].plot(t, [x["kv_cache_usage"] for x in w], label="KV usage")
    axes[1].set_ylabel("KV cache usage")
    for q in (50, 90, 99):
        axes[2].plot(t, [x.get(f"p{q}_ms", float("nan")) for x in w], label=f"p{q}")
    axes[2].set_ylabel("latency (ms)")
    axes[2].set_xlabel("time (s)")
    axes[2].legend()
    fig.suptitle(f"soak: {data['duration_s']} s, {data['concurrency']} workers, "
                 f"{data['summary']['requests']} requests, {data['summary']['errors']} unexpected")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default: 600)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds per sample window (default: 10)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent workers (default: 8)")
    p.add_argument("--warmup-windows", type=int, default=1, help="windows left out of the summary (default: 1)")
    p.add_argument("--model", default=None, help="checkpoint to serve (default: the bundled demo)")
    p.add_argument("--url", default=None, help="soak a running server instead (its RSS is not sampled)")
    p.add_argument("--served-model-name", default="soak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DOCS, help="result directory (default: docs/benchmarks)")
    args = p.parse_args(argv)
    if args.url:
        windows = asyncio.run(soak(args.url, None, args))
    else:
        server_args = ["--served-model-name", args.served_model_name, *(["--model", args.model] if args.model else [])]
        with serve(server_args, Path(tempfile.mkdtemp()) / "server.log") as server:
            windows = asyncio.run(soak(server.url, server.proc.pid, args))
    import torch
    data = {"command": "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "environment": environment(torch.device("cpu")), "duration_s": args.duration,
            "interval_s": args.interval, "concurrency": args.concurrency, "model": args.model or "demo",
            "windows": windows, "summary": summarize(windows, args.warmup_windows)}
    stem = f"soak_{data['environment']['device_type']}"
    path = write_results(stem, data, markdown(data), args.out)
    png = args.out / f"{stem}.png"
    wrote = plot(data, png)
    print(json.dumps(data["summary"], indent=2))
    print(f"results: {path} (+ .md{', .png' if wrote else ''})")
    return 0 if data["summary"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
