"""Sampler on the CPU: the batched `sample` against the per-row `sample_ref` it replaced.

    python benchmarks/bench_sampler.py            # batches 1, 64, 256; vocab 32768; 1 and 2 threads
    python benchmarks/bench_sampler.py --quick    # CI smoke run (small, written to a temp dir)
    python benchmarks/bench_sampler.py --solo 2,3 # also batch 1 of MIX[2] alone, of MIX[3] alone

Each batch cycles through a fixed mix of requests (see MIX: greedy, temperature alone, top_p,
top_k, min_p, penalties with logit_bias and min_tokens; 1 sampled row in 6 seeded); every
row has a 128-token prompt and 32 output tokens. Two logit styles: `peaked` (LM-like: a N(0, 2^2)
bulk and 32 plausible tokens lifted by 8-16 (per row), so the median top_p=0.9 set holds about a
dozen tokens, with a tail of flat rows: the script prints the statistics) and `flat` (N(0, 1):
sets of thousands of tokens, the worst case: `sample_ref` sorts each row, `sample` finds them by
its value threshold). Batch 1 is MIX[0] (greedy) alone; `--solo` adds batch-1 cases of other MIX
entries alone (`batch` "1:<index>" in the results). Timed: one call on a fresh copy of the logits
(the copy not timed), the two samplers in turn, median of --repeats. Before timing, each case checks that greedy and seeded rows get the same tokens from
both. Writes docs/benchmarks/sampler_cpu.{json,md} (--quick: a temporary directory).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elas_serve.engine.sampler import SamplingRow, sample  # noqa: E402
from elas_serve.engine.sampler_ref import sample_ref  # noqa: E402
from elas_serve.sampling_params import SamplingParams  # noqa: E402

from common import environment, write_results  # noqa: E402

PENALTIES = dict(repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1)
MIX = [  # (share name, params); a batch of B rows takes MIX[i % len(MIX)] for row i
    ("greedy", dict(temperature=0.0)),
    ("temperature", dict(temperature=0.8)),
    ("top_p", dict(temperature=0.7, top_p=0.9)),
    ("top_p", dict(temperature=1.0, top_p=0.95)),
    ("top_k", dict(temperature=1.0, top_k=50)),
    ("min_p", dict(temperature=1.0, top_p=0.95, min_p=0.05)),
    ("penalties", dict(temperature=0.9, top_p=0.95, logit_bias={17: 5.0, 42: -100.0}, **PENALTIES)),
    ("greedy+penalties", dict(temperature=0.0, **PENALTIES)),
]


def make_rows(batch: int, vocab: int, seed: int, first: int = 0) -> list[SamplingRow]:
    """Rows for a batch: row i takes MIX[(first + i) % len(MIX)] (seeded and min_tokens by i)."""
    rng = random.Random(seed)
    shared = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(batch):
        kw = dict(MIX[(first + i) % len(MIX)][1])
        if kw["temperature"] > 0 and (i % 16 in (1, 10) or batch == 1):  # 2 of the 12 sampled rows in 16
            kw["seed"] = 1000 + i
        params = SamplingParams(**kw)
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else shared
        blocked = [0, 1] if i % 5 == 0 else []  # EOS + a stop id while below min_tokens
        rows.append(SamplingRow(params, [rng.randrange(vocab) for _ in range(128)],
                                [rng.randrange(vocab) for _ in range(32)], blocked, gen))
    return rows


def make_logits(style: str, batch: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g)
    if style == "flat":
        return logits
    ids = torch.randint(0, vocab, (batch, 32), generator=g)  # 32 plausible tokens per row, lifted
    lift = torch.rand(batch, 1, generator=g) * 8 + 8  # by 8-16 over a N(0, 2^2) bulk
    return (logits * 2).scatter(1, ids, lift + torch.randn(batch, 32, generator=g) * 2)


def nucleus_stats(logits: torch.Tensor, p: float = 0.9) -> dict:
    """The top_p=0.9 set at temperature 1 (tokens): median, 90th percentile, share of rows over 1024."""
    probs = torch.softmax(logits, -1).sort(-1, descending=True).values
    size = (probs.cumsum(-1) < p).sum(-1).add(1).float()
    return {"median": float(size.median()), "p90": float(size.quantile(0.9)),
            "over_1024": float((size > 1024).float().mean())}


def time_pair(logits: torch.Tensor, rows: list[SamplingRow], repeats: int) -> tuple[dict, dict]:
    """Wall and process-CPU milliseconds of `sample_ref` and `sample`, called in turn (so both see
    the same machine load); the first round warms the allocator up and is not counted.
    NOTE: with 1 thread, CPU time leaves out the time other processes took the core."""
    wall: dict = {sample_ref: [], sample: []}
    cpu: dict = {sample_ref: [], sample: []}
    for _ in range(repeats + 1):
        for fn in wall:
            x = logits.clone()
            t0, c0 = time.perf_counter(), time.process_time()
            fn(x, rows)
            wall[fn].append((time.perf_counter() - t0) * 1e3)
            cpu[fn].append((time.process_time() - c0) * 1e3)
    return tuple({"median_ms": statistics.median(wall[fn][1:]), "min_ms": min(wall[fn][1:]),
                  "cpu_median_ms": statistics.median(cpu[fn][1:]), "repeats": repeats} for fn in wall)


def check(logits: torch.Tensor, batch: int, vocab: int, first: int = 0) -> int:
    """Greedy and seeded rows: the same token from both samplers (fresh generators each)."""
    ours = sample(logits.clone(), make_rows(batch, vocab, 0, first))
    ref = sample_ref(logits.clone(), make_rows(batch, vocab, 0, first))
    rows = make_rows(batch, vocab, 0, first)
    exact = [i for i, r in enumerate(rows) if r.params.greedy or r.params.seed is not None]
    bad = [i for i in exact if ours[i] != ref[i]]
    if bad:
        raise SystemExit(f"batch {batch}: rows {bad[:5]} differ between sample and sample_ref")
    return len(exact)


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Sampler on the CPU ({env['device']})", "",
             f"torch {env['torch']}, commit {env['commit']}, {env['date']}. vocab {result['vocab']}; "
             "mixed parameters (benchmarks/bench_sampler.py MIX); one `sample` call, median of "
             f"{result['repeats']} (milliseconds). The top_p=0.9 set at temperature 1 (tokens): "
             + "; ".join(f"{s}: median {n['median']:g}, p90 {n['p90']:g}, {100 * n['over_1024']:.0f}% of rows "
                         "over 1024" for s, n in result["nucleus"].items()) + ".", "",
             f"The machine has {result['cpu_count']} cores; `load` is the 1-minute load average after each case "
             "(other processes competing for them).", "",
             "`cpu` columns: process CPU time (with 1 thread: the time the core was ours; with 2 it adds both "
             "threads up).", "",
             "| logits | threads | batch | sample_ref (ms) | sample (ms) | speedup | cpu: sample_ref | cpu: sample "
             "| cpu speedup | load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        ref, new = r["ref"], r["new"]
        lines.append(f"| {r['style']} | {r['threads']} | {r['batch']} | {ref['median_ms']:.2f} | "
                     f"{new['median_ms']:.2f} | {r['speedup']:.1f}x | {ref['cpu_median_ms']:.2f} | "
                     f"{new['cpu_median_ms']:.2f} | {ref['cpu_median_ms'] / new['cpu_median_ms']:.1f}x | "
                     f"{r['load_avg_1min']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--styles", default="peaked,flat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--solo", default="2", help="MIX indices also timed alone at batch 1 (seeded); '' for none")
    p.add_argument("--quick", action="store_true", help="vocab 4096, batches 1 and 16, 2 repeats")
    p.add_argument("--out", type=Path, default=None, help="JSON path (markdown next to it)")
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.batches, args.repeats = 4096, "1,16", 2
    cases = [(int(b), 0) for b in args.batches.split(",")] + [(1, int(i)) for i in args.solo.split(",") if i]
    styles = args.styles.split(",")
    results = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for style in styles:
            for batch, first in cases:
                label = batch if not first else f"{batch}:{first}"  # batch 1 of MIX[first] alone
                logits = make_logits(style, batch, args.vocab, seed=batch)
                checked = check(logits, batch, args.vocab, first)
                rows = make_rows(batch, args.vocab, 1, first)
                ref, new = time_pair(logits, rows, args.repeats)
                r = {"style": style, "threads": threads, "batch": label, "ref": ref, "new": new,
                     "speedup": ref["median_ms"] / new["median_ms"], "rows_checked_exact": checked,
                     "load_avg_1min": os.getloadavg()[0]}  # NOTE: other work on the machine shows here
                results.append(r)
                print(f"{style:6s} threads={threads} batch={label!s:>4s}  sample_ref {ref['median_ms']:9.2f} ms  "
                      f"sample {new['median_ms']:8.2f} ms  {r['speedup']:5.1f}x  ({checked} rows equal, "
                      f"load {r['load_avg_1min']:.1f})", flush=True)
    env = environment(torch.device("cpu"))
    env["cpu_threads"] = args.threads
    result = {"environment": env, "cpu_count": os.cpu_count(), "vocab": args.vocab, "repeats": args.repeats,
              "mix": [[name, {k: v for k, v in kw.items()}] for name, kw in MIX],
              "nucleus": {s: nucleus_stats(make_logits(s, 256, args.vocab, 0)) for s in styles},
              "results": results}
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench_sampler_")) / "sampler_quick.json" if args.quick else None)
    md = markdown(result)
    path = write_results(out.stem, result, md, out.parent) if out else write_results("sampler_cpu", result, md)
    print(md)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
