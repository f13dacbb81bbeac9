"""Ahead-of-time compilation of Triton launches for a GPU that is not there: what
`inspect_kernels.py` is built on.

`capture_launches(arch)` installs a stand-in Triton driver for the target (cuda, sm<arch>) and a
JIT hook, so calling a launcher records each launch exactly as the runtime would specialise it
(integers equal to 1 become constexprs, multiples of 16 get divisibility hints, 16-byte aligned
pointers) and skips its compile and launch. `compile_record` compiles one recorded launch with
`triton.compile` and reads what the compiler made of it: ptxas registers and spills, shared memory,
the tensor-core instruction in the PTX, async copies, and which TTGIR loops with a dot are fed by
async copies. `compile_all` does that in worker processes, so a compiler crash fails one record.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path


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


def compile_all(entries: list[dict], arch: int, jobs: int, progress: bool) -> list[dict]:
    """Compile every entry in `jobs` worker processes; a compiler crash fails only its record."""

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
