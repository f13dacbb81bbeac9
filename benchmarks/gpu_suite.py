"""The one command that needs a GPU: every GPU check and benchmark, in about 6 minutes, one JSON.

    python benchmarks/gpu_suite.py --out $OUT            # on an H100/H200 (or any CUDA GPU)
    python benchmarks/gpu_suite.py --dry-run --out DIR   # anywhere: every stage, CPU-sized (CI)

Stages, each in its own subprocess with its own time limit (a crash or a hang in one never loses the
others; the JSON is rewritten after each):
  tests     the `gpu`-marked tests outside the kernels, interpreter off
  kernels   the kernels' `gpu` tests: correctness at the 350m and 1b shapes in bf16, the cuSPARSELt
            layout bit for bit against torch._cslt_compress, the tuner
  ffn       benchmarks/bench_ffn.py at 350m and 1b on a reduced M ladder: every backend and baseline
  step      benchmarks/bench_step.py: kernels per decode step, batch-1 decode latency against the
            weight-bytes floor, with and without CUDA graphs
  e2e       benchmarks/bench_e2e.py: a random 350m checkpoint, compiled with CUDA graphs, sparse24
            against dense, and the same workload through Hugging Face transformers on the dense LLaMA
            of that shape (1b and the fused backend only in the ffn stage: compiles cost minutes)
Writes OUT/gpu-<date>-<device>.json (device, driver, versions, commit, every stage's figures and
log tail) and OUT/gpu_suite.log, nothing else (the device tool brings back at most 8 files); `--report FILE.json` turns a result into its markdown (ratios:
fused / dense FFN by M, sparse / dense end to end, ours / transformers, ours / floor). Read
/work/.library/device/METHOD.md (how to time) before changing a stage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# (stage, seconds allowed on a GPU); the sum stays under 6 minutes
STAGES = (("tests", 40), ("kernels", 60), ("ffn", 60), ("step", 100), ("e2e", 100))


def _pytest(args: list[str], dry: bool, out: Path, name: str) -> dict:
    junit = out / f"{name}.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
           *args] + (["--collect-only"] if dry else [])
    env = {**os.environ, "TRITON_INTERPRET": "1" if dry else "0"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    result = {"returncode": proc.returncode, "output_tail": (proc.stdout + proc.stderr)[-4000:]}
    if junit.exists() and not dry:
        import xml.etree.ElementTree as ET
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        result |= {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        result["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                            if c.find("failure") is not None or c.find("error") is not None]
    elif dry:
        result["collected"] = sum(1 for line in proc.stdout.splitlines() if "::" in line)
    return result


def stage_tests(dry: bool, out: Path) -> dict:
    tests = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py"))
             if not p.name.startswith(("test_kernels_", "test_ffn_tuning"))]
    return _pytest(tests, dry, out, "gpu_tests")


def stage_kernels(dry: bool, out: Path) -> dict:
    tests = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_kernels_*.py"))]
    return _pytest(tests + ["tests/test_ffn_tuning.py"], dry, out, "gpu_kernel_tests")


def stage_ffn(dry: bool, out: Path) -> dict:
    import bench_ffn
    if dry:
        return bench_ffn.run({"tiny": (64, 132, 16)}, (1, 8), dtype="float32", device="cpu", repeats=1,
                             compile_baseline=False, progress=False)
    return bench_ffn.run(("350m", "1b"), (1, 8, 512, 4096, 16384), repeats=10, eager=False)


def stage_step(dry: bool, out: Path) -> dict:
    import bench_step
    if dry:
        return bench_step.run(device="cpu", quick=True)
    # NOTE: the demo and 350m only: each model is compiled, and its decode graphs captured, in-stage
    return bench_step.run(device="cuda", presets=("350m",), batches=(1, 16), steps=16, rounds=2)


def stage_e2e(dry: bool, out: Path) -> dict:
    import bench_e2e
    if dry:
        return {"tiny": bench_e2e.run("tiny", [2], 8, 4, "cpu", "float32", ["dense"], None, 1)}
    # NOTE: every engine is compiled and its decode graphs captured before it is timed: within the
    # stage's limit that fits 350m with the dense and sparse24 backends (1b and `fused`: bench_ffn)
    return {"350m": bench_e2e.run("350m", [1, 16], 128, 64, "cuda", "bfloat16", ["dense", "sparse24"], None, 3)}


def run_stage(name: str, dry: bool, out: Path) -> None:
    """In the child: run one stage, write OUT/stage_<name>.json."""
    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    t0 = time.time()
    try:
        result = {"ok": True, "result": globals()[f"stage_{name}"](dry, out)}
    except Exception as e:  # noqa: BLE001 (recorded: the suite goes on)
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    result["seconds"] = time.time() - t0
    (out / f"stage_{name}.json").write_text(json.dumps(result, indent=1, default=str))


def environment() -> dict:
    import torch

    from common import environment as env_of
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = env_of(device)
    if device.type == "cuda":
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            env["driver"] = None
        props = torch.cuda.get_device_properties(device)
        env |= {"sm": f"{props.major}{props.minor}", "multiprocessors": props.multi_processor_count,
                "memory_gib": props.total_memory / 2 ** 30}
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    p.add_argument("--dry-run", action="store_true", help="CPU-sized stages (no GPU needed)")
    p.add_argument("--stages", default=",".join(s for s, _ in STAGES))
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one stage here
    p.add_argument("--report", type=Path, default=None, help="write the markdown of a result JSON and exit")
    args = p.parse_args(argv)
    if args.report is not None:
        from gpu_report import markdown
        data = json.loads(args.report.read_text())
        args.report.with_suffix(".md").write_text(markdown(data))
        print(args.report.with_suffix(".md"))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage:
        run_stage(args.stage, args.dry_run, args.out)  # NOTE: here `out` is the parent's scratch dir
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    limits = dict(STAGES)
    env = environment()
    if env["device_type"] != "cuda" and not args.dry_run:
        print("no CUDA device: run with --dry-run for the CPU-sized version", file=sys.stderr)
        return 2
    # NOTE: letters, digits, '.', '_' and '-' only: what the device tool brings back from $OUT
    device = re.sub(r"[^A-Za-z0-9._-]+", "_", env["device"]).strip("_")
    stem = f"gpu-{time.strftime('%Y-%m-%d')}-{device}" + ("-dry" if args.dry_run else "")
    data = {"environment": env, "dry_run": args.dry_run, "stages": {}}
    log = open(args.out / "gpu_suite.log", "w")
    for name in args.stages.split(","):
        limit = limits[name] * (4 if args.dry_run else 1)
        t0 = time.time()
        print(f"[gpu_suite] {name}: up to {limit} s", flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--out", str(scratch)] + (
            ["--dry-run"] if args.dry_run else [])
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
            tail, code = (proc.stdout + proc.stderr)[-6000:], proc.returncode
        except subprocess.TimeoutExpired as e:
            tail, code = f"timed out after {limit} s\n" + ((e.stdout or b"") + (e.stderr or b"")).decode()[-6000:], None
        log.write(f"===== {name} (exit {code}, {time.time() - t0:.1f} s)\n{tail}\n")
        log.flush()
        result_file = scratch / f"stage_{name}.json"
        stage = json.loads(result_file.read_text()) if result_file.exists() else {"ok": False}
        stage |= {"exit_code": code, "wall_s": time.time() - t0}
        if not stage.get("ok"):
            stage["log_tail"] = tail[-3000:]
        data["stages"][name] = stage
        (args.out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
        print(f"[gpu_suite] {name}: {'ok' if stage.get('ok') else 'FAILED'} in {stage['wall_s']:.1f} s", flush=True)
    log.close()
    failed = [n for n, s in data["stages"].items() if not s.get("ok")]
    print(f"[gpu_suite] wrote {args.out / (stem + '.json')}; failed stages: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
