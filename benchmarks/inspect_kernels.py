"""Ahead-of-time compilation of every Triton kernel configuration the FFN launchers issue, and what
the compiler made of each: registers, spills, shared memory, tensor-core instruction, async copies.

    python benchmarks/inspect_kernels.py --arch 90 --json docs/benchmarks/kernels_sm90.json
    python benchmarks/inspect_kernels.py --arch 80 --subset --json /tmp/kernels_sm80.json

No GPU is needed. The launchers run on `meta` tensors at the preset shapes (130m, 350m, 1b) and
token counts, under a stand-in Triton driver for the target (cuda, sm<arch>, `AOT_NUM_SMS` SMs), so
each launch is specialised exactly as the runtime does it (integers equal to 1 become constexprs,
multiples of 16 get divisibility hints, pointers are 16-byte aligned); a JIT hook records the launch
instead of compiling it there, and each distinct one is then compiled with `triton.compile` (TTGIR,
PTX, ptxas). One record per configuration: `kernel`, `config` (constexprs, warps, stages), `dtype`,
`uses_dot`, `registers`, `spills` (spill store + load bytes), `shared_bytes`, `mma` (`wgmma`, `mma`
or null), instruction counts (`wgmma`, `mma_sync`, `cp_async`, `tma`), `loops_with_dot` and
`loops_with_dot_async` (scf.for loops whose own body has a dot, and those of them with an async
copy), and `issued_by` (the launches that issue it). `--subset` compiles a representative subset
(350m and 1b, bf16, a few token counts): what the CI test runs.

Needs `TRITON_INTERPRET` unset (the interpreter has no compiler). Compile results, not measurements:
they say what the code is, not how fast it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aot_compile import capture_launches, compile_all, compile_record  # noqa: E402

__all__ = ["capture_launches", "compile_record", "inspect", "launch_plan"]

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"130m": (768, 3072, 256), "350m": (1024, 4104, 256), "1b": (2048, 8191, 512)}  # hidden, F, r
TOKENS = (1, 8, 32, 128, 512, 2048, 8192, 16384)
SUBSET = {"shapes": ("350m", "1b"), "tokens": (1, 32, 512, 8192), "dtypes": ("bfloat16",)}
SMEM_LIMIT = {90: 232448, 80: 166912}  # max dynamic shared memory per block (H100, A100)


def launch_plan(shapes: dict, tokens: tuple[int, ...], dtypes: tuple[str, ...], arch: int):
    """(label, thunk) for every launcher call the FFN backends make at these shapes."""
    import torch

    from elas_serve.kernels import gemm_relu2_sparse24 as up
    from elas_serve.kernels.cslt_layout import padded_shape
    from elas_serve.kernels.ffn_fused import relu2_sparse24_ffn
    from elas_serve.kernels.ops import sparse24_route
    from elas_serve.kernels.relu2_sparse24 import relu2_sparse24_pruned
    from elas_serve.kernels.sparse24_gemv import sparse24_gemv
    from elas_serve.kernels.sparse24_matmul import sparse24_matmul

    def t(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    for name, (hidden, width, rank) in shapes.items():
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            w_up, w_down = t(width, rank, dtype=dtype), t(width, rank, dtype=dtype)  # LORO factors
            w_up_dense, w_down_dense = t(width, hidden, dtype=dtype), t(hidden, width, dtype=dtype)
            for m in tokens:
                a, x = t(m, rank, dtype=dtype), t(m, hidden, dtype=dtype)
                tag = f"{name} {dtype_name} T={m}"
                # dense (CUDA): the up GEMM with its epilogue, then cuBLAS (fp32 stays in PyTorch)
                if dtype != torch.float32:
                    yield f"{tag} dense", lambda a=a, w=w_up: up.up_relu2_sparse24(a, w, True)
                    yield f"{tag} dense dense-up", lambda x=x, w=w_up_dense: up.up_relu2_sparse24(x, w, True)
                if dtype == torch.float16:
                    continue  # NOTE: the sparse backends refuse float16 (relu ** 2 overflow)
                # fused: low-rank, dense down (weight.T), dense up (K = hidden)
                yield f"{tag} fused", lambda a=a: relu2_sparse24_ffn(a, w_up, w_down, True)
                yield f"{tag} fused dense-down", lambda a=a: relu2_sparse24_ffn(a, w_up, w_down_dense.T, True)
                yield f"{tag} fused dense-up", lambda x=x: relu2_sparse24_ffn(x, w_up_dense, w_down, True)
                # sparse24: decode GEMV, else the producer for cuSPARSELt or for the Triton 2:4 GEMM
                if sparse24_route(m, dtype, cslt=False) == "gemv":
                    y = t(m, width, dtype=dtype)
                    yield f"{tag} sparse24 gemv", lambda y=y: sparse24_gemv(y, w_down)
                    continue
                yield f"{tag} sparse24 triton", lambda a=a: sparse24_matmul(up.up_relu2_sparse24_compress(a, w_up), w_down)
                if sparse24_route(m, dtype, cslt=True) == "cusparselt":
                    yield f"{tag} sparse24 cslt", lambda a=a: up.up_relu2_sparse24_cslt(a, w_up, arch)
                    h, shape = t(m, width, dtype=dtype), padded_shape(m, width - width % 4, arch)
                    yield f"{tag} sparse24 cslt fallback", lambda h=h, shape=shape: relu2_sparse24_pruned(h, *shape)


def inspect(arch: int, subset: bool = False, progress: bool = True, jobs: int | None = None) -> dict:
    """Capture every launch of the plan, compile each distinct one; returns the result dict."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("inspect_kernels compiles kernels: run it with TRITON_INTERPRET unset")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import torch
    import triton

    jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    shapes = {k: SHAPES[k] for k in (SUBSET["shapes"] if subset else SHAPES)}
    tokens = SUBSET["tokens"] if subset else TOKENS
    dtypes = SUBSET["dtypes"] if subset else ("bfloat16", "float16", "float32")
    with capture_launches(arch) as (launches, label):
        for name, thunk in launch_plan(shapes, tokens, dtypes, arch):
            label["now"] = name
            thunk()
    records = compile_all(list(launches.values()), arch, jobs, progress)
    from common import git_commit
    return {"arch": arch, "subset": subset, "smem_limit": SMEM_LIMIT[arch], "triton": triton.__version__,
            "commit": git_commit(),
            "torch": torch.__version__, "shapes": shapes, "tokens": list(tokens), "dtypes": list(dtypes),
            "records": records}


def summary(result: dict) -> str:
    lines = [f"sm{result['arch']}, triton {result['triton']}: {len(result['records'])} configurations",
             f"{'kernel':34s} {'dtype':5s} {'config':58s} {'regs':>4s} {'spill':>5s} {'smem':>7s} "
             f"{'mma':5s} {'cp.async':>8s} {'loops':>5s}"]
    for r in result["records"]:
        cfg = ",".join(f"{k}={v}" for k, v in r["config"].items() if k.startswith(("BLOCK", "num_", "OUT",
                                                                                    "RESIDENT", "TWO")))
        lines.append(f"{r['kernel']:34s} {str(r['dtype']):5s} {cfg[:58]:58s} {r['registers']:>4} {r['spills']:>5} "
                     f"{r['shared_bytes']:>7} {str(r['mma']):5s} {r['cp_async']:>8} "
                     f"{r['loops_with_dot_async']}/{r['loops_with_dot']}")
    return "\n".join(lines)


TILE_KEYS = ("OUT", "RESIDENT", "BLOCK_T", "BLOCK_F", "BLOCK_G", "BLOCK_K", "BLOCK_N", "PRUNED", "BLOCK")


def markdown(result: dict) -> str:
    """One row per kernel, dtype and tile configuration (specialisations of it merged): register
    range, spills, shared memory, tensor-core instruction, async copies, what issues it."""
    groups: dict[tuple, list[dict]] = {}
    for r in result["records"]:
        if "error" in r:
            continue
        tile = tuple((k, r["config"][k]) for k in TILE_KEYS if k in r["config"]) + (
            ("warps", r["config"]["num_warps"]), ("stages", r["config"]["num_stages"]))
        groups.setdefault((r["kernel"], r["dtype"], tile), []).append(r)
    lines = [f"sm{result['arch']}, Triton {result['triton']}, {len(result['records'])} configurations "
             f"({'subset' if result['subset'] else 'full sweep'}: {', '.join(result['shapes'])}; "
             f"{', '.join(result['dtypes'])}; T in {result['tokens']}); shared-memory limit "
             f"{result['smem_limit']} B.", "",
             "| kernel | dtype | tile | registers | spills (B) | shared (B) | MMA | cp.async | dot loops async | issued by (e.g.) |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---|"]
    for (kernel, dtype, tile), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], str(kv[0][2]))):
        regs = sorted({r["registers"] for r in rs})
        reg = f"{regs[0]}" if len(regs) == 1 else f"{regs[0]}-{regs[-1]}"
        cfg = " ".join(f"{k}={v}" for k, v in tile)
        lines.append(f"| `{kernel}` | {dtype} | {cfg} | {reg} | {max(r['spills'] for r in rs)} | "
                     f"{max(r['shared_bytes'] for r in rs)} | {rs[0]['mma'] or '-'} | {max(r['cp_async'] for r in rs)} | "
                     f"{sum(r['loops_with_dot_async'] for r in rs)}/{sum(r['loops_with_dot'] for r in rs)} | "
                     f"{rs[0]['issued_by'][0]} |")
    errors = [r for r in result["records"] if "error" in r]
    lines += [f"- **{r['kernel']} {r['config']}: {r['error'][:200]}**" for r in errors]
    return "\n".join(lines) + "\n"


def _tile(r: dict) -> tuple:
    return tuple((k, r["config"][k]) for k in TILE_KEYS if k in r["config"]) + (
        ("warps", r["config"]["num_warps"]), ("stages", r["config"]["num_stages"]))


def compare_markdown(results: list[dict], dtype: str = "bf16", models: tuple[str, ...] = ("350m", "1b")) -> str:
    """One row per kernel and tile issued at `models` in `dtype`; per result (arch, Triton): the
    register range / spill bytes / shared KB / tensor-core instruction of that tile."""
    keys: dict[tuple, str] = {}
    for res in results:
        for r in res["records"]:
            if "error" not in r and r["dtype"] == dtype and any(i.split()[0] in models for i in r["issued_by"]):
                keys.setdefault((r["kernel"], _tile(r)), next(i for i in r["issued_by"] if i.split()[0] in models))
    heads = [f"sm{res['arch']} Triton {res['triton']}" for res in results]
    lines = ["| kernel | tile | issued by (e.g.) | " + " | ".join(heads) + " |",
             "|---|---|---|" + "---|" * len(heads)]
    for (kernel, tile), who in sorted(keys.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        cells = []
        for res in results:
            rs = [r for r in res["records"] if "error" not in r and r["kernel"] == kernel and _tile(r) == tile
                  and r["dtype"] == dtype]
            if not rs:
                cells.append("-")
                continue
            regs = sorted({r["registers"] for r in rs})
            cells.append(f"{regs[0]}{'-' + str(regs[-1]) if len(regs) > 1 else ''} / {max(r['spills'] for r in rs)} / "
                         f"{max(r['shared_bytes'] for r in rs) / 1024:.0f} / {rs[0]['mma'] or '-'}")
        cfg = " ".join(f"{k}={v}" for k, v in tile)
        lines.append(f"| `{kernel.strip('_')}` | {cfg} | {who.split(' ', 2)[-1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, choices=[80, 90])
    p.add_argument("--json", type=Path, help="where to write the records")
    p.add_argument("--compare", type=Path, nargs="+", default=None,
                   help="print the bf16 350m/1b comparison table of these result files (no compiling)")
    p.add_argument("--subset", action="store_true", help="the representative subset CI compiles")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPUs, at most 4)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the grouped markdown table here")
    args = p.parse_args(argv)
    if args.compare:
        print(compare_markdown([json.loads(f.read_text()) for f in args.compare]))
        return 0
    if args.arch is None or args.json is None:
        p.error("--arch and --json are required (or --compare)")
    sys.path.insert(0, str(ROOT))
    result = inspect(args.arch, args.subset, jobs=args.jobs)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(result))
    print(summary(result))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    with contextlib.redirect_stderr(io.StringIO()) if os.environ.get("INSPECT_QUIET") else contextlib.nullcontext():
        sys.exit(main())
