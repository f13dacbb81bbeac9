"""Run metrics: `metrics.jsonl` (one JSON object per line) and the loss-curve PNG made from it.

Lines are `{"kind": "train", "step", "loss", "lr", "tokens", "tokens_per_s", "elapsed_s"}` or
`{"kind": "eval", "step", "loss", "perplexity", "bits_per_byte", "tokens"}`; `step` counts
optimizer updates done. On `--resume` the lines past the resumed step are dropped, so the file
always describes one continuous run. Only the main process writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, kind: str, step: int, **values: Any) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_file: Path, png: Path, title: str = "training loss") -> Path | None:
    """Train and eval loss against step; returns None (and says why) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("elas-serve: note: matplotlib is not installed; no loss-curve PNG "
              "(pip install 'elas-serve[train]')")
        return None
    rows = read_metrics(metrics_file)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for kind, style in (("train", "-"), ("eval", "o-")):
        points = [(r["step"], r["loss"]) for r in rows if r["kind"] == kind]
        if points:
            ax.plot(*zip(*points), style, label=f"{kind} loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
