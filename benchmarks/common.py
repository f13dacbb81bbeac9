"""Shared by the benchmark scripts: the environment record and writing results.

Every result file carries where and how it was measured (device, versions, commit, threads), so a
number in docs/benchmarks/ can always be traced to the run that printed it.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    import triton
    env = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
           "triton": triton.__version__, "python": platform.python_version(),
           "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
           "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    return env


def write_results(stem: str, data: dict[str, Any], markdown: str, out_dir: Path = DOCS) -> Path:
    """Write `<stem>.json` (raw) and `<stem>.md` (made from it); returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown)
    return path


def serve(args: list[str], log_path: Path, timeout: float = 600.0):
    """`elas-serve serve ARGS` on a free loopback port, for a `with` block (ready once /health is
    200; SIGTERM on exit); the object has `.url`, `.proc` and the log at `log_path`."""
    import sys

    from elas_serve.clients.process import ManagedProcess, free_port
    port = free_port()
    server = ManagedProcess([sys.executable, "-m", "elas_serve.cli", "serve", "--port", str(port), *args],
                            f"http://127.0.0.1:{port}/health", log_path, timeout)
    server.url = f"http://127.0.0.1:{port}"
    return server
