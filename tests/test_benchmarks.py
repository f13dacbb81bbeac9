"""The benchmark scripts run end to end in their CPU-sized form, so a long run (a 10-minute soak,
a GPU window) is never wasted on a script that cannot start or write its results.

Run: python -m pytest tests/test_benchmarks.py -v
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_soak_writes_its_windows_and_summary(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--duration", "6", "--interval", "2",
                           "--concurrency", "3", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "soak_cpu.json").read_text())
    assert len(data["windows"]) == 3 and data["summary"]["requests"] > 0 and data["summary"]["errors"] == 0
    assert all(w["rss_mib"] > 0 and 0 <= w["kv_cache_usage"] <= 1 for w in data["windows"])
    assert (tmp_path / "soak_cpu.md").read_text().startswith("# Soak test")


def test_gpu_suite_dry_run_runs_every_stage(tmp_path):
    """What a GPU window would run, CPU-sized: every stage imports, runs and reports (issue: GPU time
    comes in a few minutes, so the one command must not fail on a script error there)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (result,) = tmp_path.glob("gpu-*-dry.json")
    data = json.loads(result.read_text())
    assert data["dry_run"] and set(data["stages"]) == {"tests", "kernels", "ffn", "step", "e2e"}
    failed = {name: s.get("error") or s.get("log_tail", "")[-500:] for name, s in data["stages"].items() if not s["ok"]}
    assert not failed, failed
    step = data["stages"]["step"]["result"]
    assert step["models"][0]["kernels_compiled"]["per_layer"] > 0 and step["floor"]
    assert (tmp_path / "gpu_suite.log").exists()
