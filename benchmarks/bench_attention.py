"""Paged attention: the Triton kernel against the PyTorch reference, per (batch, context).

    python benchmarks/bench_attention.py                        # CUDA: 350m and GQA shapes, bf16
    python benchmarks/bench_attention.py --quick --device cpu   # CPU smoke run (Triton interpreter)

Cases: `decode` (B sequences, one query each, all of `context` tokens) and `prefill` (one sequence,
`context` queries over `context` tokens). Timed per case: `triton` (`paged_attention`, the kernel
alone; the KV-cache store is not included), `ref` (`paged_attention_ref`, the eager path, which
gathers the blocks of the longest sequence); block tables are as wide as --max-model-len (the kernel
reads only the blocks each sequence uses, as in the engine's CUDA graphs). Every case
first checks the kernel against the float32 reference (max abs error). CUDA times: CUDA events,
L2 flushed before each repeat, median over repeats (`bench_ffn.time_us`), microseconds.
Writes raw JSON and a markdown table (--out; default docs/benchmarks/attention_<gpu>.json on CUDA,
a temporary directory with --quick).

NOTE: CPU numbers time the Triton interpreter; they prove the script runs and mean nothing about
GPU speed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {"350m": (16, 16, 64), "gqa": (32, 8, 128)}  # (heads, kv heads, head_dim)
QUICK_SHAPES = {"tiny": (4, 2, 32)}
DECODE = ([1, 16, 64, 256], [128, 1024, 4096])  # batches, contexts
PREFILL = [512, 2048]
QUICK_DECODE, QUICK_PREFILL = ([1, 4], [32, 96]), [48]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=8192, help="block-table width (tokens)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats, args.max_model_len = 1, 2, 128
    return args


def make_case(num_heads: int, num_kv_heads: int, head_dim: int, query_lens: list[int], seq_lens: list[int],
              block_size: int, width: int, dtype, device: str):
    """Random cache and queries; each sequence owns a random set of blocks (shuffled table)."""
    import torch

    g = torch.Generator().manual_seed(0)
    needed = [-(-s // block_size) for s in seq_lens]
    num_blocks = 1 + sum(needed)
    perm = torch.randperm(num_blocks - 1, generator=g) + 1
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    start = 0
    for i, n in enumerate(needed):
        tables[i, :n] = perm[start:start + n]
        start += n
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(device, dtype)
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=g).to(device, dtype)
    starts = torch.tensor([0] + query_lens).cumsum(0).to(device=device, dtype=torch.int32)
    return q, cache, tables.to(device), starts, torch.tensor(seq_lens, dtype=torch.int32, device=device)


def run_case(model: str, shape: tuple[int, int, int], kind: str, batch: int, context: int, args) -> list[dict]:
    import torch
    from bench_ffn import time_us

    from elas_serve.kernels.paged_attention import paged_attention_ref
    from elas_serve.kernels.paged_attention_triton import paged_attention

    dtype = getattr(torch, args.dtype)
    query_lens = [1] * batch if kind == "decode" else [context] * batch
    seq_lens = [context] * batch
    width = -(-max(context, args.max_model_len) // args.block_size)
    q, cache, tables, starts, lens = make_case(*shape, query_lens, seq_lens, args.block_size, width, dtype,
                                               args.device)
    scale = shape[2] ** -0.5
    out = paged_attention(q, cache, tables, starts, lens, scale)
    err = (out.float() - paged_attention_ref(q.float(), cache.float(), tables, query_lens, seq_lens, scale)
           ).abs().max().item()
    fns = {"triton": lambda: paged_attention(q, cache, tables, starts, lens, scale),
           "ref": lambda: paged_attention_ref(q, cache, tables, query_lens, seq_lens, scale)}
    base = {"model": model, "heads": shape[0], "kv_heads": shape[1], "head_dim": shape[2], "kind": kind,
            "batch": batch, "context": context, "max_abs_err": err}
    rows = []
    for name, fn in fns.items():
        for _ in range(args.warmup):
            fn()
        row = {**base, "impl": name, "median_us": time_us(fn, args.device, args.repeats, graph=False)}
        rows.append(row)
        print(f"{model:5s} {kind:7s} B={batch:4d} ctx={context:5d} {name:9s} {row['median_us']:11.1f} us"
              f"  (err {err:.1e})", flush=True)
    return rows


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Paged attention on {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, {result['dtype']}, block size "
             f"{result['block_size']}, commit {env['commit']}, {env['date']}. Median microseconds "
             "(`triton` is the kernel alone) over block tables of max_model_len "
             f"{result['max_model_len']}.", "",
             "| model | kind | batch | context | triton | ref | ref / triton | max abs err |",
             "|---|---|---|---|---|---|---|---|"]
    cases: dict[tuple, dict] = {}
    for r in result["timings"]:
        cases.setdefault((r["model"], r["kind"], r["batch"], r["context"]), {"err": r["max_abs_err"]})[r["impl"]] = \
            r["median_us"]
    for (model, kind, batch, context), t in cases.items():
        lines.append(f"| {model} | {kind} | {batch} | {context} | {t['triton']:.1f} | {t['ref']:.1f} | "
                     f"{t['ref'] / t['triton']:.2f} | {t['err']:.1e} |")
    if env["device_type"] == "cpu":
        lines += ["", "CPU: the Triton interpreter; these times say nothing about GPU speed."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # NOTE: before triton.jit runs, i.e. before the imports
    import torch

    from common import environment, write_results

    shapes = QUICK_SHAPES if args.quick else SHAPES
    (batches, contexts), prefills = (QUICK_DECODE, QUICK_PREFILL) if args.quick else (DECODE, PREFILL)
    env = environment(torch.device(args.device))
    print(env)
    timings = []
    for model, shape in shapes.items():
        for batch in batches:
            for context in contexts:
                timings += run_case(model, shape, "decode", batch, context, args)
        for context in prefills:
            timings += run_case(model, shape, "prefill", 1, context, args)
    result = {"environment": env, "dtype": args.dtype, "block_size": args.block_size,
              "max_model_len": args.max_model_len, "timings": timings}
    if args.out is not None:
        out_dir, stem = args.out.parent, args.out.stem
    elif args.quick:
        out_dir, stem = Path(tempfile.mkdtemp(prefix="bench_attention_")), "attention_quick"
    else:
        slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
        out_dir, stem = None, f"attention_{slug}"
    md = markdown(result)
    path = write_results(stem, result, md) if out_dir is None else write_results(stem, result, md, out_dir)
    print(md)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
