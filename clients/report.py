"""What a run leaves behind: the result dict (vLLM's keys, then ours), the summary table on stdout
(vLLM's layout, so results read the same) and the result JSON (vLLM's file naming under
--result-dir unless --result-filename is given).

As in vLLM, `latencies` and `queue_times` are always in the result, the other per-request arrays
(`input_lens, output_lens, ttfts, itls, start_times, errors, generated_texts`, and our `tpots`)
only with --save-detailed; they cover every request sent, failed ones included.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .client import metrics_delta
from .metrics import RequestResult, calculate_metrics, percentile_key, result_fields, tpot

if TYPE_CHECKING:
    from .loadgen import LoadConfig

HEADERS = {"ttft": ("TTFT", "Time to First Token"), "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
           "itl": ("ITL", "Inter-token Latency"), "e2el": ("E2EL", "End-to-end Latency")}
WIDTH = 50


def _row(name: str, value: Any) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{name:<40} {text:<10}"


def build_result(cfg: LoadConfig, model: str, tokenizer_id: str | None, results: list[RequestResult],
                 duration: float, before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any]:
    metrics = calculate_metrics(results, duration, cfg.metric_percentiles, cfg.goodput or None)
    fields = result_fields(metrics, cfg.percentile_metrics, cfg.metric_percentiles)
    clash = sorted(set(cfg.metadata) & (set(fields) | {"date", "backend", "model_id", "request_rate"}))
    if clash:
        raise ValueError(f"--metadata {clash[0]}=... would overwrite a result field of that name")
    result: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "endpoint_type": cfg.backend, "backend": cfg.backend,
        "label": cfg.label, "model_id": model, "tokenizer_id": tokenizer_id, "num_prompts": cfg.num_prompts,
        **cfg.metadata, "request_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate,
        "burstiness": cfg.burstiness, "max_concurrency": cfg.max_concurrency, **fields,
        "latencies": [r.latency for r in results], "queue_times": [r.client_queue_time for r in results],
        "rtfx": 0.0,  # vLLM's inverse real-time factor of audio requests: none here
        "base_url": cfg.base_url, "endpoint": cfg.endpoint, "duration_limit": cfg.duration, "seed": cfg.seed,
        "dataset": cfg.dataset_name if cfg.dataset_path is None else f"{cfg.dataset_name}:{cfg.dataset_path}",
        "random_input_len": cfg.random_input_len, "random_output_len": cfg.random_output_len,
        "random_range_ratio": cfg.random_range_ratio, "random_prefix_len": cfg.random_prefix_len,
        "goodput_slos_ms": cfg.goodput or None, "server_ffn_backend": ffn_backend(after),
        "server_metrics_delta": metrics_delta(before, after)}
    if cfg.save_detailed:
        result.update({"input_lens": [r.prompt_len for r in results], "output_lens": [r.output_len for r in results],
                       "ttfts": [r.ttft for r in results], "tpots": [tpot(r) for r in results],
                       "itls": [r.itl for r in results], "start_times": [r.start_time for r in results],
                       "errors": [r.error for r in results], "generated_texts": [r.generated_text for r in results]})
    return result


def ffn_backend(samples: dict[str, float] | None) -> str | None:
    """The `backend` label of the server's `elas:ffn_backend_info` (None for another server)."""
    for key, value in (samples or {}).items():
        if key.startswith("elas:ffn_backend_info{") and value == 1:
            return key.split('backend="', 1)[1].split('"', 1)[0]
    return None


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


def save_result(r: dict[str, Any], path: Path, append: bool = False) -> Path:
    """The JSON at `path`; with `append` (vLLM's --append-result) one more line of JSON at its end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if append:
        with path.open("a") as f:
            f.write(("\n" if f.tell() else "") + json.dumps(r, default=str))
    else:
        path.write_text(json.dumps(r, indent=2, default=str) + "\n")
    return path
