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
