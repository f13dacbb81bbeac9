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
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"130m": (768, 3072, 256), "350m": (1024, 4104, 256), "1b": (2048, 8191, 512)}  # hidden, F, r
TOKENS = (1, 8, 32, 128, 512, 2048, 8192, 16384)
SUBSET = {"shapes": ("350m", "1b"), "tokens": (1, 32, 512, 8192), "dtypes": ("bfloat16",)}
SMEM_LIMIT = {90: 232448, 80: 166912}  # max dynamic shared memory per block (H100, A100)


class _AotDriver:
    """Stands in for Triton's CUDA driver: a target to specialise and compile for, no device."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("meta")

    def is_active(self):
        return True


@contextlib.contextmanager
def capture_launches(arch: int):
    """Within: Triton launches are recorded (not compiled, not run) into the yielded dict."""
    import triton
    from triton import knobs
    from triton.runtime import driver

    launches: dict[tuple, dict] = {}
    label = {"now": ""}

    def hook(*args, **kwargs):
        fn, info = kwargs["fn"], kwargs["compile"]
        key = (fn.name, info["key"])
        jit = fn.jit_function
        entry = launches.setdefault(key, {"fn": (jit.fn.__module__, jit.fn.__name__), "info": info, "issued_by": []})
        if label["now"] not in entry["issued_by"]:
            entry["issued_by"].append(label["now"])
        return True  # NOTE: skip the JIT's own compile; the launch then does nothing

    old_hook, old_driver = knobs.runtime.jit_cache_hook, driver._active
    driver.set_active(_AotDriver(arch))
    knobs.runtime.jit_cache_hook = hook
    try:
        yield launches, label
    finally:
        knobs.runtime.jit_cache_hook = old_hook
        driver._active = old_driver  # NOTE: not reset_active(): without a GPU there is no default
    assert triton  # imported for its side effects on the driver registry


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


def _ptxas_info(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from `ptxas -v` on the kernel's PTX (Triton's own ptxas)."""
    from triton.backends.nvidia import compiler as nv
    try:
        ptxas = nv.get_ptxas(arch).path  # the ptxas Triton itself runs for this arch
    except TypeError:  # older Triton: one ptxas
        ptxas = nv.get_ptxas().path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(src), "-o",
                               str(Path(tmp) / "k.o")], capture_output=True, text=True)
    log = proc.stderr + proc.stdout
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log[-2000:]}")
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(stores.group(1)) if stores else 0,
            "spill_loads": int(loads.group(1)) if loads else 0,
            "stack_bytes": int(stack.group(1)) if stack else 0}


def _loop_bodies(ttgir: str) -> list[str]:
    """The own body (nested loops cut out) of every scf.for in TTGIR text."""
    bodies, starts = [], [m.start() for m in re.finditer(r"scf\.for\b", ttgir)]
    spans = []
    for s in starts:
        i = ttgir.rindex("{", s, ttgir.index("\n", s))  # the header ends with its body's brace
        depth, j = 0, i
        while True:
            if ttgir[j] == "{":
                depth += 1
            elif ttgir[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        spans.append((s, j))
    for s, e in spans:
        text, cut = ttgir[s:e], 0
        for s2, e2 in spans:
            if s < s2 and e2 <= e:
                text = text[:s2 - s - cut] + text[e2 - s - cut:]
                cut += e2 - s2
        bodies.append(text)
    return bodies


def _jit_function(module: str, name: str):
    import importlib
    fn = getattr(importlib.import_module(module), name)
    return getattr(fn, "fn", fn) if not hasattr(fn, "arg_names") else fn


def compile_record(entry: dict, arch: int) -> dict:
    """Compile one captured launch; `entry`: {"fn": (module, name), "info", "issued_by"}."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    fn, info = _jit_function(*entry["fn"]), entry["info"]
    attrs = info["configs"][0] if isinstance(info.get("configs"), list) else info.get("configs", {})
    src = ASTSource(fn, info["signature"], info["constants"], attrs)
    options = {k: info[k] for k in ("num_warps", "num_stages", "num_ctas") if k in info}
    start = time.time()
    kernel = triton_compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    asm = kernel.asm
    ptx, ttgir = asm["ptx"], asm["ttgir"]
    names = list(info["signature"])
    constexprs = {names[k[0]]: v for k, v in info["constants"].items() if k[0] < len(names)}
    config = {k: v for k, v in constexprs.items() if k.isupper()}
    config.update(num_warps=options.get("num_warps"), num_stages=options.get("num_stages"))
    pointer_dtypes = [v for v in info["signature"].values() if isinstance(v, str) and v.startswith("*")]
    wgmma = len(re.findall(r"wgmma\.mma_async", ptx))
    mma_sync = len(re.findall(r"\bmma\.sync", ptx))
    bodies = [b for b in _loop_bodies(ttgir) if re.search(r"tt\.dot\b|warp_group_dot", b)]
    record = {
        "kernel": fn.__name__, "config": config, "dtype": pointer_dtypes[0][1:] if pointer_dtypes else None,
        "uses_dot": bool(re.search(r"tt\.dot\b|warp_group_dot", ttgir)),
        **_ptxas_info(ptx, arch),
        "shared_bytes": kernel.metadata.shared,
        "mma": "wgmma" if wgmma else "mma" if mma_sync else None,
        "wgmma": wgmma, "mma_sync": mma_sync,
        "cp_async": len(re.findall(r"cp\.async\.c[ag]\.shared", ptx)),
        "tma": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        "loops_with_dot": len(bodies),
        "loops_with_dot_async": sum(bool(re.search(r"async_copy_global_to_local|async_tma_copy", b)) for b in bodies),
        "converts_in_dot_loops": sum(len(re.findall(r"ttg\.convert_layout", b)) for b in bodies),
        "compile_s": round(time.time() - start, 2),
        "issued_by": entry["issued_by"],
    }
    record["spills"] = record["spill_stores"] + record["spill_loads"]
    return record


def _failed_record(entry: dict, error: str) -> dict:
    names = list(entry["info"]["signature"])
    config = {names[k[0]]: v for k, v in entry["info"]["constants"].items() if names[k[0]].isupper()}
    return {"kernel": entry["fn"][1], "config": config, "error": error[-2000:], "issued_by": entry["issued_by"]}


def _compile_all(entries: list[dict], arch: int, jobs: int, progress: bool) -> list[dict]:
    """Compile every entry in `jobs` worker processes; a compiler crash fails only its record."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    records: list[dict | None] = [None] * len(entries)
    todo = list(range(len(entries)))
    bar = tqdm(total=len(entries), desc=f"compile sm{arch}", disable=not progress, file=sys.stderr)
    while todo:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = {i: pool.submit(compile_record, entries[i], arch) for i in todo}
            todo = []
            for i, fut in futures.items():
                try:
                    records[i] = fut.result()
                except BrokenProcessPool:
                    todo.append(i)  # NOTE: a crash breaks the pool: rerun the rest, one at a time
                except Exception as e:  # noqa: BLE001 - a compile error is a result to record
                    records[i] = _failed_record(entries[i], repr(e))
                else:
                    bar.update()
            if todo and len(futures) == 1:  # the lone entry crashed the compiler itself
                records[todo[0]] = _failed_record(entries[todo[0]], "the compiler crashed (see stderr)")
                bar.update()
                todo = []
        jobs = 1 if todo else jobs
        if todo:  # isolate the crashing one
            first, todo = todo[0], todo[1:]
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
                try:
                    records[first] = pool.submit(compile_record, entries[first], arch).result()
                except BrokenProcessPool:
                    records[first] = _failed_record(entries[first], "the compiler crashed (see stderr)")
                except Exception as e:  # noqa: BLE001
                    records[first] = _failed_record(entries[first], repr(e))
            bar.update()
    bar.close()
    return records


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
    records = _compile_all(list(launches.values()), arch, jobs, progress)
    return {"arch": arch, "subset": subset, "smem_limit": SMEM_LIMIT[arch], "triton": triton.__version__,
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, choices=[80, 90], required=True)
    p.add_argument("--json", type=Path, required=True, help="where to write the records")
    p.add_argument("--subset", action="store_true", help="the representative subset CI compiles")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPUs, at most 4)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the grouped markdown table here")
    args = p.parse_args(argv)
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
