"""Benchmark of one ELAS FFN layer: every backend and the fair baselines, per preset shape and token
count, with bytes, FLOPs and the fraction of its roofline each reaches.

    python benchmarks/bench_ffn.py                                   # CUDA, 130m/350m/1b, M 1..16384
    python benchmarks/bench_ffn.py --models 350m,1b --tokens 1,8,512,4096,16384   # the GPU suite's run
    python benchmarks/bench_ffn.py --quick --device cpu              # CI smoke run (interpreter)

Variants (same function unless said): `eager_masked` (the PyTorch reference with its eager 2:4
mask), `eager_unmasked` (relu ** 2 without 2:4: what the FFN costs with no sparsity work; not the
same function), `compiled` (the masked reference under torch.compile), `dense` (the epilogue-fused
dense chain: the `dense` backend on CUDA), `sparse24` (its automatic route) and its forced routes
`sparse24_cslt`, `sparse24_triton`, `sparse24_gemv`, `fused`; and the two cores the cuSPARSELt
target is about, without the low-rank glue GEMMs: `core_dense` (up GEMM + epilogue, cuBLAS GEMM)
and `core_cslt` (up GEMM writing cuSPARSELt's layout, `_cslt_sparse_mm`). CUDA times are CUDA-graph
replays of one call (`graph`) and eager calls (`eager`), the L2 flushed before each, median of
--repeats, in microseconds. Roofline: `ffn_roofline.py` (arithmetic for the device's peaks, H100's
where the device is not an H100/H200). Results: docs/benchmarks/ffn_<device>.json and .md
(`benchmarks/common.py`). `run(...)` is the entry point the GPU suite calls.

NOTE: CPU numbers time the Triton interpreter; they show the script works and mean nothing else.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ffn_roofline as roof  # noqa: E402

PRESET_SHAPES = {"130m": (768, 3072, 256), "350m": (1024, 4104, 256), "1b": (2048, 8191, 512)}
QUICK_SHAPES = {"tiny": (64, 129, 16)}
TOKENS, QUICK_TOKENS = (1, 8, 32, 128, 512, 2048, 8192, 16384), (1, 8, 33)
VARIANTS = ("eager_masked", "eager_unmasked", "compiled", "dense", "sparse24", "sparse24_cslt", "sparse24_triton",
            "sparse24_gemv", "fused", "core_dense", "core_cslt")


def preset_shapes() -> dict[str, tuple[int, int, int]]:
    """(hidden, FFN width, rank) of the trainer's presets (elas_serve/train/presets.py)."""
    try:
        from elas_serve.train.presets import PRESETS
    except ImportError:
        return dict(PRESET_SHAPES)
    return {k: (p.hidden_size, int(1.5 * p.intermediate_size), p.rank) for k, p in PRESETS.items()
            if k in PRESET_SHAPES}


def make_ffn(hidden: int, width: int, rank: int, num_tokens: int, dtype, device: str, seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    x = rnd(num_tokens, hidden, std=1.0)
    up = (rnd(hidden, rank, std=hidden ** -0.5), rnd(width, rank, std=rank ** -0.5))
    down = (rnd(width, rank, std=width ** -0.5), rnd(hidden, rank, std=rank ** -0.5))
    return x, up, down


def variants(x, up, down, device: str, compiled_fn) -> dict:
    """name -> (thunk, roofline model name) of every variant that applies to this input."""

    from elas_serve.kernels import ffn, ops, sparse24_cslt
    from elas_serve.kernels.gemm_relu2_sparse24 import up_relu2_sparse24
    m = x.shape[0]
    cslt = device == "cuda" and sparse24_cslt.cslt_supported(x.device, x.dtype) and m > ops.CSLT_MAX_SKIP_TOKENS
    a = x @ up[0]
    route = ops.sparse24_route(m, x.dtype, cslt)
    out = {"eager_masked": (lambda: ffn.ffn_reference(x, up, down, True), "eager_masked"),
           "eager_unmasked": (lambda: ffn.ffn_reference(x, up, down, False), "eager_unmasked"),
           "dense": (lambda: ffn.ffn_dense_chain(x, up, down, True), "dense"),
           "sparse24": (lambda: ffn.ffn_sparse24(x, up, down, True), f"sparse24_{'cslt' if route == 'cusparselt' else route}"),
           "sparse24_triton": (lambda: ffn.ffn_sparse24(x, up, down, True, gemm="triton"), "sparse24_triton"),
           "fused": (lambda: ffn.ffn_fused(x, up, down, True), "fused"),
           "core_dense": (lambda: up_relu2_sparse24(a, up[1], True) @ down[0], "core_dense")}
    if compiled_fn is not None:
        out["compiled"] = (lambda: compiled_fn(x, up, down, True), "compiled")
    if m <= 16:
        out["sparse24_gemv"] = (lambda: ffn.ffn_sparse24(x, up, down, True, gemm="gemv"), "sparse24_gemv")
    if cslt:
        out["sparse24_cslt"] = (lambda: ffn.ffn_sparse24(x, up, down, True, gemm="cusparselt"), "sparse24_cslt")
        out["core_cslt"] = (lambda: sparse24_cslt.sparse24_matmul_cslt(a, up[1], down[0]), "core_cslt")
    return {k: out[k] for k in VARIANTS if k in out}


def time_us(fn, device: str, repeats: int, graph: bool) -> float:
    """Median microseconds of `fn()`: CPU wall clock, or CUDA events (graph replay or eager) with
    the L2 flushed before each repeat."""
    import torch
    if device == "cpu":
        fn()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(samples)
    from elas_serve.kernels.ffn_tuning import L2_FLUSH_BYTES, graph_replay_seconds
    if graph:
        return 1e6 * graph_replay_seconds(fn, repeats)
    fn()
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    samples = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    return statistics.median(samples)


def _model(model_name: str, m: int, shape: tuple[int, int, int], dev) -> dict:
    hidden, width, rank = shape
    if model_name.startswith("core_"):  # the variant without its first and last (glue) GEMMs
        ks = roof.variant_kernels("dense" if model_name == "core_dense" else "sparse24_cslt", m, *shape)[1:-1]
        return {"bytes": sum(k.bytes for k in ks), "flops": sum(k.flops for k in ks),
                "roofline_us": 1e6 * sum(k.seconds(dev) for k in ks)}
    recompute = -(-rank // 256) if model_name == "fused" else 1  # fused: 256-wide N tiles
    return roof.roofline(model_name, m, hidden, width, rank, dev, recompute)


def run(shapes=None, ms=None, dtype: str = "bfloat16", device: str = "cuda", repeats: int = 20,
        graphs: bool = True, eager: bool = True, compile_baseline: bool = True, progress: bool = True) -> dict:
    """Check and time every variant at every (shape, M); returns the result dict (module docstring).

    `shapes`: names of PRESET_SHAPES or a {name: (hidden, width, rank)} dict; `ms`: token counts.
    """
    import torch
    from tqdm import tqdm

    from elas_serve.kernels import ffn

    from common import environment
    if isinstance(shapes, dict):
        table = dict(shapes)
    else:
        presets = preset_shapes()
        table = {k: presets[k] for k in (shapes or presets)}
    ms = tuple(ms or TOKENS)
    torch_dtype = getattr(torch, dtype)
    env = environment(torch.device(device))
    dev = roof.device_for(env["device"])
    env["roofline_device"] = dev.name
    modes = ([True] if graphs else []) + ([False] if eager else []) if device == "cuda" else [False]
    compiled = torch.compile(ffn.ffn_reference, dynamic=True) if compile_baseline else None
    rows, checks = [], []
    steps = tqdm(total=len(table) * len(ms), desc="bench_ffn", disable=not progress, file=sys.stderr)
    for name, shape in table.items():
        for m in ms:
            x, up, down = make_ffn(*shape, m, torch_dtype, device)
            with torch.inference_mode():
                ref = ffn.ffn_reference(x, up, down, True).float()
                for variant, (fn, model_name) in variants(x, up, down, device, compiled).items():
                    row = {"model": name, "hidden": shape[0], "width": shape[1], "rank": shape[2], "tokens": m,
                           "variant": variant, "roofline_model": model_name, **_model(model_name, m, shape, dev)}
                    try:
                        out = fn()
                        if not variant.startswith(("core_", "eager_unmasked")):
                            err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                            checks.append({"model": name, "tokens": m, "variant": variant, "rel_err": err,
                                           "ok": err < 5e-2})
                        for graph in modes:
                            us = time_us(fn, device, repeats, graph)
                            rows.append({**row, "mode": "graph" if graph else "eager" if device == "cuda" else "cpu",
                                         "median_us": us, "fraction_of_roofline": row["roofline_us"] / us})
                    except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
                        rows.append({**row, "mode": "error", "error": repr(e)[:300]})
            steps.update()
    steps.close()
    return {"environment": env, "dtype": dtype, "repeats": repeats, "shapes": table, "tokens": list(ms),
            "rows": rows, "checks": checks, "targets": targets(rows, table, dev)}


def _t(rows, model, m, variant, mode):
    return next((r["median_us"] for r in rows if r["model"] == model and r["tokens"] == m
                 and r["variant"] == variant and r["mode"] == mode and "median_us" in r), None)


def targets(rows: list[dict], shapes: dict, dev: roof.Device) -> list[dict]:
    """The issue's targets, evaluated where the rows have the numbers (GPU graph-replay times)."""
    out = []
    mode = "graph"
    if not any(r["mode"] == mode for r in rows):
        return out  # NOTE: CPU (interpreter) times say nothing about the targets

    def add(what, value, goal):
        if value is not None:
            out.append({"target": what, "value": round(value, 3), "goal": goal, "met": value >= goal})

    for m in sorted({r["tokens"] for r in rows}):
        if m >= 4096 and "350m" in shapes:
            fused, dense = _t(rows, "350m", m, "fused", mode), _t(rows, "350m", m, "dense", mode)
            masked = _t(rows, "350m", m, "eager_masked", mode)
            cd, cc = _t(rows, "350m", m, "core_dense", mode), _t(rows, "350m", m, "core_cslt", mode)
            add(f"350m M={m}: fused speed-up over the epilogue-fused dense chain", dense / fused if fused and dense else None, 1.3)
            add(f"350m M={m}: fused speed-up over the masked eager chain", masked / fused if fused and masked else None, 4.0)
            add(f"350m M={m}: cuSPARSELt core over the dense core", cd / cc if cd and cc else None, 1.15)
        if m <= 8:
            for model, shape in shapes.items():
                best = min((v for v in (_t(rows, model, m, b, mode) for b in ("dense", "sparse24", "fused")) if v),
                           default=None)
                floor = roof.weight_floor_us(*shape, dev)
                add(f"{model} M={m}: weight-bytes floor / best FFN time (>= 1/1.3)", floor / best if best else None,
                    round(1 / 1.3, 3))
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# FFN layer benchmark: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit {env['commit']}, "
             f"{env['date']}, dtype {result['dtype']}, median of {result['repeats']}. Roofline: arithmetic for "
             f"{env['roofline_device']} peaks (`benchmarks/ffn_roofline.py`), not a measurement.", ""]
    if env["device_type"] == "cpu":
        lines += ["**CPU run under the Triton interpreter: these numbers say nothing about GPU speed.**", ""]
    for mode in sorted({r["mode"] for r in result["rows"] if r["mode"] != "error"}):
        lines += [f"## {mode} (us; in brackets: fraction of roofline; x: speed-up over dense / masked eager)", ""]
        names = [v for v in VARIANTS if any(r["variant"] == v and r["mode"] == mode for r in result["rows"])]
        lines += ["| model | M | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
        for model in result["shapes"]:
            for m in result["tokens"]:
                cells = []
                dense, masked = (_t(result["rows"], model, m, v, mode) for v in ("dense", "eager_masked"))
                for v in names:
                    r = next((r for r in result["rows"] if (r["model"], r["tokens"], r["variant"], r["mode"])
                              == (model, m, v, mode)), None)
                    if r is None:
                        cells.append("-")
                        continue
                    cell = f"{r['median_us']:.1f} [{r['fraction_of_roofline']:.2f}]"
                    if v not in ("dense", "eager_masked", "eager_unmasked", "core_dense") and dense and masked:
                        cell += f" {dense / r['median_us']:.2f}x/{masked / r['median_us']:.1f}x"
                    cells.append(cell)
                lines.append(f"| {model} | {m} | " + " | ".join(cells) + " |")
        lines.append("")
    errors = [r for r in result["rows"] if r["mode"] == "error"]
    if errors:
        lines += ["## errors", ""] + [f"- {r['model']} M={r['tokens']} {r['variant']}: `{r['error']}`" for r in errors] + [""]
    lines += ["## targets", ""]
    lines += [f"- {t['target']}: {t['value']} (goal {t['goal']}): {'met' if t['met'] else '**not met**'}"
              for t in result["targets"]] or ["- none evaluated (needs GPU graph-replay timings)"]
    bad = [c for c in result["checks"] if not c["ok"]]
    lines += ["", f"## correctness: {len(result['checks']) - len(bad)}/{len(result['checks'])} variant outputs "
              "within 5e-2 (relative) of the reference", ""]
    lines += [f"- **{c['model']} M={c['tokens']} {c['variant']}: {c['rel_err']:.2e}**" for c in bad]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(PRESET_SHAPES))
    p.add_argument("--tokens", default=None, help="comma-separated token counts")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-eager", action="store_true", help="CUDA: graph replays only")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat (CPU smoke run)")
    p.add_argument("--out", type=Path, default=None, help="result directory (default docs/benchmarks)")
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # NOTE: before triton.jit runs, i.e. before the imports
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from common import DOCS, write_results
    shapes = QUICK_SHAPES if args.quick else (args.models.split(",") if args.models else None)
    ms = [int(t) for t in args.tokens.split(",")] if args.tokens else (QUICK_TOKENS if args.quick else TOKENS)
    result = run(shapes, ms, args.dtype, args.device, 1 if args.quick else args.repeats, eager=not args.no_eager,
                 compile_baseline=not (args.no_compile or args.quick))
    slug = re.sub(r"[^a-z0-9]+", "-", result["environment"]["device"].lower()).strip("-")
    stem = "ffn_cpu_quick" if args.device == "cpu" else f"ffn_{slug}"
    path = write_results(stem, result, markdown(result), args.out or DOCS)
    print(markdown(result))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
