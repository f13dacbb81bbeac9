"""What a run leaves behind: the summary table on stdout (vLLM's layout, so results read the same)
and the result JSON (vLLM's file naming under --result-dir unless --result-filename is given)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .metrics import percentile_key

HEADERS = {"ttft": ("TTFT", "Time to First Token"), "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
           "itl": ("ITL", "Inter-token Latency"), "e2el": ("E2EL", "End-to-end Latency")}
WIDTH = 50


def _row(name: str, value: Any) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{name:<40} {text:<10}"


def summary_table(r: dict[str, Any], percentile_metrics: list[str], percentiles: list[float]) -> str:
    lines = [" Serving Benchmark Result ".center(WIDTH, "="),
             _row("Successful requests:", r["completed"]), _row("Failed requests:", r["failed"])]
    if r["max_concurrency"] is not None:
        lines.append(_row("Maximum request concurrency:", r["max_concurrency"]))
    if r["request_rate"] != "inf":
        lines.append(_row("Request rate configured (RPS):", float(r["request_rate"])))
    lines += [_row("Benchmark duration (s):", r["duration"]),
              _row("Total input tokens:", r["total_input_tokens"]),
              _row("Total generated tokens:", r["total_output_tokens"]),
              _row("Request throughput (req/s):", r["request_throughput"])]
    if r["request_goodput"] is not None:
        lines.append(_row("Request goodput (req/s):", r["request_goodput"]))
    lines += [_row("Output token throughput (tok/s):", r["output_throughput"]),
              _row("Peak output token throughput (tok/s):", r["max_output_tokens_per_s"]),
              _row("Peak concurrent requests:", r["max_concurrent_requests"]),
              _row("Total token throughput (tok/s):", r["total_token_throughput"])]
    for name in percentile_metrics:
        short, header = HEADERS[name]
        lines += [header.center(WIDTH, "-"),
                  _row(f"Mean {short} (ms):", r[f"mean_{name}_ms"]),
                  _row(f"Median {short} (ms):", r[f"median_{name}_ms"])]
        for p in percentiles:
            key = percentile_key(p)
            lines.append(_row(f"{key.upper()} {short} (ms):", r[f"{key}_{name}_ms"]))
    if r.get("server_ffn_backend"):
        lines += ["Server".center(WIDTH, "-"), _row("FFN backend:", r["server_ffn_backend"])]
    if r["errors_by_message"]:
        lines.append("Errors".center(WIDTH, "-"))
        lines += [f"{count:>5} x {message}" for message, count in r["errors_by_message"].items()]
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def result_path(r: dict[str, Any], result_dir: Path | None, result_filename: str | None) -> Path:
    """vLLM's `{label}-{rate}qps[-concurrency{N}]-{model}-{date}.json` unless a name is given."""
    if result_filename:
        name = result_filename
    else:
        rate = r["request_rate"] if r["request_rate"] == "inf" else float(r["request_rate"])
        conc = f"-concurrency{r['max_concurrency']}" if r["max_concurrency"] is not None else ""
        model = str(r["model_id"]).rstrip("/").split("/")[-1]
        name = f"{r['label'] or 'elas-loadtest'}-{rate}qps{conc}-{model}-{r['date']}.json"
    return (result_dir or Path(".")) / name


def save_result(r: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r, indent=2, default=str) + "\n")
    return path
