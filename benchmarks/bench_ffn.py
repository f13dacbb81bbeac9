"""Benchmark of the ELAS FFN backends: correctness against `dense` at the real ELAS shapes, then the
latency of one FFN per backend and token count.

    python benchmarks/bench_ffn.py                      # CUDA: 60m..1b, tokens 1..4096, bf16
    python benchmarks/bench_ffn.py --device cpu --quick # CPU smoke run (Triton interpreter)

Shapes are one layer's FFN with LORO factors, (hidden, width, rank): 60m (512, 2064, 128), 130m
(768, 3072, 256), 350m (1024, 4104, 256), 1b (2048, 8191, 512). Timed: `dense` (the reference, with
the 2:4 mask), `dense_no24` (relu ** 2 without 2:4: what the FFN costs without any sparsity work),
`sparse24_triton`, `sparse24_cslt` (where the cuSPARSELt probe passes), `fused`, and the parts of
sparse24: `compress` (relu ** 2 + 2:4 + compression of h) and `gemm_triton` (2:4 GEMM with the
down projection's first factor). CUDA times: CUDA events around each call, L2 flushed before each
repeat, median over repeats, in microseconds; with --cuda-graphs also the replay of a captured
graph of one call (launch overhead removed). Writes raw JSON (--out, default
docs/benchmarks/ffn_<device>.json) and a markdown table next to it (same name, .md).

NOTE: CPU numbers time the Triton interpreter; they prove the script runs and mean nothing about
GPU speed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"60m": (512, 2064, 128), "130m": (768, 3072, 256), "350m": (1024, 4104, 256),
          "1b": (2048, 8191, 512)}
QUICK_SHAPES = {"tiny129": (64, 129, 16), "tiny96": (48, 96, 16)}
TOKENS, QUICK_TOKENS = [1, 16, 64, 256, 1024, 4096], [1, 16]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(SHAPES))
    p.add_argument("--tokens", default=None, help="comma-separated token counts")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--cuda-graphs", action="store_true", help="also time CUDA-graph replays")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 3)
    return args


def load_kernels():
    """`elas_serve.kernels`, or the repository's kernels/ package when elas-serve is not installed."""
    try:
        import elas_serve.kernels as kernels
    except ImportError:
        sys.path.insert(0, str(ROOT))
        import kernels
    return kernels


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "benchmarks"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("ELAS_GIT_COMMIT", "unknown")


def time_us(fn, device: str, warmup: int, repeats: int, graph: bool = False) -> dict:
    """Median/p10/p90 latency of `fn()` in microseconds."""
    import torch

    if device == "cpu":
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
    else:
        for _ in range(warmup):
            fn()
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            fn = g.replay
            fn()
        flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=device)
        torch.cuda.synchronize()
        samples = []
        for _ in range(repeats):
            flush.zero_()  # NOTE: weights come from HBM, as they do when 24 layers run in turn
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
    q = statistics.quantiles(samples, n=10) if len(samples) >= 2 else samples * 9
    return {"median_us": statistics.median(samples), "p10_us": q[0], "p90_us": q[-1], "repeats": repeats}


def make_ffn(hidden: int, width: int, rank: int, num_tokens: int, dtype, device: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    x = rnd(num_tokens, hidden, std=1.0)
    up = (rnd(hidden, rank, std=hidden ** -0.5), rnd(width, rank, std=rank ** -0.5))
    down = (rnd(width, rank, std=width ** -0.5), rnd(hidden, rank, std=rank ** -0.5))
    return x, up, down


def rel_err(got, ref) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def check(model: str, shape: tuple[int, int, int], num_tokens: int, dtype, device: str,
          cslt: bool) -> list[dict]:
    """Every backend against dense (and fused against the reference on its own pre-activations)."""
    import torch

    K = load_kernels()
    ffn_dense, ffn_sparse24 = K.ffn_dense, K.ffn_sparse24
    x, up, down = make_ffn(*shape, num_tokens, dtype, device, seed=1)
    ref = ffn_dense(x, up, down, True)
    # sparse24 selects on the very same pre-activations as dense: only GEMM rounding differs.
    # fused accumulates h itself, so in bf16 near-ties flip (dense bf16 vs float64 differs by ~1.5%
    # for that reason alone): a loose bound here, the tight check is on the kernel's own h below.
    runs = {"sparse24_triton": (functools.partial(ffn_sparse24, gemm="triton"), 1e-2),
            "fused": (K.ffn_fused, 5e-2)}
    if cslt:
        runs["sparse24_cslt"] = (functools.partial(ffn_sparse24, gemm="cusparselt"), 1e-2)
    rows = []
    for name, (fn, bound) in runs.items():
        err = rel_err(fn(x, up, down, True), ref)
        rows.append({"model": model, "tokens": num_tokens, "check": f"{name} vs dense", "rel_err": err,
                     "bound": bound, "ok": err < bound})
    a = x @ up[0]
    h = torch.empty(num_tokens, shape[1], dtype=dtype, device=device)
    z = K.relu2_sparse24_ffn(a, up[1], down[0], True, h_out=h)
    err = rel_err(z, K.relu2_sparse24_ref(h).float() @ down[0].float())
    rows.append({"model": model, "tokens": num_tokens, "check": "fused kernel vs reference on its own h",
                 "rel_err": err, "bound": 1e-2, "ok": err < 1e-2})
    return rows


def bench(model: str, shape: tuple[int, int, int], num_tokens: int, dtype, args, cslt: bool,
          graph: bool) -> list[dict]:
    K = load_kernels()
    x, up, down = make_ffn(*shape, num_tokens, dtype, args.device)
    h = K.project(x, up)
    compressed = K.relu2_sparse24_compress(h)
    fns = {
        "dense": lambda: K.ffn_dense(x, up, down, True),
        "dense_no24": lambda: K.ffn_dense(x, up, down, False),
        "sparse24_triton": lambda: K.ffn_sparse24(x, up, down, True, gemm="triton"),
        "fused": lambda: K.ffn_fused(x, up, down, True),
        "compress": lambda: K.relu2_sparse24_compress(h),
        "gemm_triton": lambda: K.sparse24_matmul(compressed, down[0]),
    }
    if cslt:
        fns["sparse24_cslt"] = lambda: K.ffn_sparse24(x, up, down, True, gemm="cusparselt")
    rows = []
    for name, fn in fns.items():
        row = {"model": model, "hidden": shape[0], "width": shape[1], "rank": shape[2],
               "tokens": num_tokens, "backend": name, "cuda_graph": graph}
        try:
            row.update(time_us(fn, args.device, args.warmup, args.repeats, graph))
        except Exception as e:  # noqa: BLE001 - e.g. a path that cannot be graph-captured
            row["error"] = repr(e)[:300]
        rows.append(row)
        print(f"{model:8s} T={num_tokens:5d} {name:16s}{' graph' if graph else '':6s} "
              + (f"{row['median_us']:10.1f} us" if "median_us" in row else row["error"]), flush=True)
    return rows


def environment(device: str) -> dict:
    import torch
    import triton

    env = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "python": sys.version.split()[0], "git_commit": git_commit(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        env["capability"] = list(torch.cuda.get_device_capability())
        backend = getattr(torch.backends, "cusparselt", None)
        env["cusparselt"] = backend.version() if backend is not None and backend.is_available() else None
    else:
        env["device_name"] = "cpu (Triton interpreter)"
    return env


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# FFN backends: {env['device_name']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, cuSPARSELt "
             f"{env.get('cusparselt')}, commit {env['git_commit']}, dtype {result['dtype']}, {env['date']}.",
             "Median latency of one FFN layer (us); speedup = dense / best of sparse24, fused.", ""]
    if env["device"] == "cpu":
        lines += ["**CPU run under the Triton interpreter: these numbers say nothing about GPU speed.**", ""]
    rows = [r for r in result["timings"] if "median_us" in r]
    names = list(dict.fromkeys(r["backend"] for r in rows))
    for graph in sorted({r["cuda_graph"] for r in rows}):
        lines += [f"## {'CUDA-graph replay' if graph else 'eager'}", "",
                  "| model | tokens | " + " | ".join(names) + " | speedup |",
                  "|---|---:|" + "---:|" * (len(names) + 1)]
        keys = list(dict.fromkeys((r["model"], r["tokens"]) for r in rows if r["cuda_graph"] == graph))
        for model, tokens in keys:
            t = {r["backend"]: r["median_us"] for r in rows
                 if r["model"] == model and r["tokens"] == tokens and r["cuda_graph"] == graph}
            best = min((v for k, v in t.items() if k in ("sparse24_triton", "sparse24_cslt", "fused")),
                       default=None)
            speed = f"{t['dense'] / best:.2f}x" if best and "dense" in t else "-"
            lines.append(f"| {model} | {tokens} | " + " | ".join(
                f"{t[n]:.1f}" if n in t else "-" for n in names) + f" | {speed} |")
        lines.append("")
    lines += ["## correctness at these shapes", "", "| model | tokens | check | rel. error | bound | ok |",
              "|---|---:|---|---:|---:|---|"]
    lines += [f"| {c['model']} | {c['tokens']} | {c['check']} | {c['rel_err']:.2e} | {c['bound']:.0e} | "
              f"{'yes' if c['ok'] else '**NO**'} |" for c in result["checks"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # NOTE: before triton.jit runs, i.e. before the imports
    import torch

    cslt_usable = load_kernels().sparse24_cslt.cslt_usable
    dtype = getattr(torch, args.dtype)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.models:
        shapes = {m: shapes[m] for m in args.models.split(",")}
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else (
        QUICK_TOKENS if args.quick else TOKENS)
    env = environment(args.device)
    cslt = args.device == "cuda" and cslt_usable(torch.device("cuda"), dtype)
    env["cslt_usable"] = cslt
    print(json.dumps(env))
    checks = []
    for model, shape in shapes.items():
        for t in sorted({tokens[0], tokens[-1], 77}):
            rows = check(model, shape, t, dtype, args.device, cslt)
            checks += rows
            print(f"check {model} T={t}: " + ", ".join(f"{c['check']} {c['rel_err']:.1e}" for c in rows))
    # NOTE: every eager timing first: a failed graph capture must not spoil them
    modes = [False, True] if args.cuda_graphs and args.device == "cuda" else [False]
    timings = [row for graph in modes for model, shape in shapes.items() for t in tokens
               for row in bench(model, shape, t, dtype, args, cslt, graph)]
    result = {"environment": env, "dtype": args.dtype, "args": {k: str(v) for k, v in vars(args).items()},
              "checks": checks, "timings": timings}
    name = env["device_name"].lower()
    slug = "cpu" if args.device == "cpu" else re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    out = args.out or ROOT / "docs" / "benchmarks" / f"ffn_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    failed = [c for c in checks if not c["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
