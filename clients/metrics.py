"""Serving metrics from per-request timings, defined exactly as vLLM's `bench serve` defines them.

Per request (client clock, `time.perf_counter`):
  TTFT  send -> the first SSE chunk that has `choices` (its text may be empty).
  ITL   the gaps between successive such chunks: one entry per chunk, not per token.
  E2EL  send -> the last such chunk.
  TPOT  (E2EL - TTFT) / (output_len - 1), only for output_len > 1; output_len is the final usage
        chunk's `completion_tokens`.
Aggregates: request_throughput = completed / duration, output_throughput = total_output /
duration; mean, median, std and percentiles as numpy computes them (`np.percentile`, linear
interpolation), of the successful requests only; ITL pools every gap of every request.
Goodput (DistServe): completed requests meeting every SLO given (ttft/tpot/e2el in ms) per second;
a request with output_len <= 1 has TPOT 0 for this purpose (as in vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds."""

    prompt_len: int = 0
    output_len: int = 0  # usage.completion_tokens (0 when failed)
    success: bool = False
    error: str = ""
    start_time: float = 0.0  # when it was sent (after any client-side queueing)
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0  # E2EL
    client_queue_time: float = 0.0  # arrival -> sent: time spent waiting for --max-concurrency
    generated_text: str = ""


@dataclass
class Summary:
    """mean, median, std and the selected percentiles of one metric, in milliseconds."""

    mean: float
    median: float
    std: float
    percentiles: dict[float, float]


def summarize(values_s: list[float], percentiles: list[float]) -> Summary:
    """Statistics of `values_s` (seconds) in ms; an empty list gives zeros (as vLLM reports)."""
    v = np.asarray(values_s if values_s else [0.0], dtype=np.float64) * 1000.0
    return Summary(float(np.mean(v)), float(np.median(v)), float(np.std(v)),
                   {p: float(np.percentile(v, p)) for p in percentiles})


def percentile_key(p: float) -> str:
    """99 -> 'p99', 99.9 -> 'p99.9' (vLLM's key naming)."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def tpot(r: RequestResult) -> float | None:
    """Time per output token excluding the first; None when output_len <= 1."""
    if r.output_len <= 1:
        return None
    return (r.latency - r.ttft) / (r.output_len - 1)


@dataclass
class BenchmarkMetrics:
    completed: int
    failed: int
    total_input: int
    total_output: int
    duration: float
    request_throughput: float
    request_goodput: float | None
    output_throughput: float
    total_token_throughput: float
    stats: dict[str, Summary]  # per metric in METRICS
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    errors: dict[str, int]  # error message -> number of failed requests


def calculate_metrics(results: list[RequestResult], duration_s: float, percentiles: list[float],
                      goodput_slos_ms: dict[str, float] | None = None) -> BenchmarkMetrics:
    if duration_s <= 0:
        raise ValueError(f"the benchmark duration must be positive, got {duration_s}")
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [t for t in map(tpot, ok) if t is not None]
    itls = [gap for r in ok for gap in r.itl]
    e2els = [r.latency for r in ok]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_len for r in ok)
    goodput = None
    if goodput_slos_ms:
        good = sum(all(_slo_value(r, name) <= limit / 1000.0 for name, limit in goodput_slos_ms.items())
                   for r in ok)
        goodput = good / duration_s
    errors: dict[str, int] = {}
    for r in results:
        if not r.success:
            errors[r.error] = errors.get(r.error, 0) + 1
    peak_tokens, peak_concurrency = _peaks(ok)
    return BenchmarkMetrics(
        completed=len(ok), failed=len(results) - len(ok), total_input=total_input,
        total_output=total_output, duration=duration_s, request_throughput=len(ok) / duration_s,
        request_goodput=goodput, output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        stats={name: summarize(values, percentiles)
               for name, values in zip(METRICS, (ttfts, tpots, itls, e2els))},
        max_output_tokens_per_s=peak_tokens, max_concurrent_requests=peak_concurrency, errors=errors)


def _slo_value(r: RequestResult, name: str) -> float:
    if name == "ttft":
        return r.ttft
    if name == "e2el":
        return r.latency
    return tpot(r) or 0.0  # NOTE: vLLM counts TPOT as 0 for output_len <= 1


def _peaks(ok: list[RequestResult]) -> tuple[float, int]:
    """vLLM's peak output tokens/s (chunks per 1-second bucket from the first send) and the peak
    number of requests in flight (sweep over half-open [start, end) intervals)."""
    if not ok:
        return 0.0, 0
    t0 = min(r.start_time for r in ok)
    t1 = max(r.start_time + r.latency for r in ok)
    buckets = np.zeros(int(np.ceil(t1 - t0)) + 1)
    for r in ok:
        times = r.start_time + r.ttft + np.concatenate([[0.0], np.cumsum(r.itl)])
        idx = (times - t0).astype(int)
        np.add.at(buckets, idx[(idx >= 0) & (idx < len(buckets))], 1)
    events = sorted([(r.start_time, 1) for r in ok] + [(r.start_time + r.latency, -1) for r in ok])
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return float(buckets.max()), peak


def result_fields(m: BenchmarkMetrics, selected: list[str], percentiles: list[float]) -> dict:
    """The metric part of a result JSON, with vLLM's key names."""
    out = {"duration": m.duration, "completed": m.completed, "failed": m.failed,
           "total_input_tokens": m.total_input, "total_output_tokens": m.total_output,
           "request_throughput": m.request_throughput, "request_goodput": m.request_goodput,
           "output_throughput": m.output_throughput, "total_token_throughput": m.total_token_throughput,
           "max_output_tokens_per_s": m.max_output_tokens_per_s,
           "max_concurrent_requests": m.max_concurrent_requests}
    for name in selected:
        s = m.stats[name]
        out[f"mean_{name}_ms"], out[f"median_{name}_ms"], out[f"std_{name}_ms"] = s.mean, s.median, s.std
        for p in percentiles:
            out[f"{percentile_key(p)}_{name}_ms"] = s.percentiles[p]
    out["errors_by_message"] = m.errors
    return out


def parse_slos(pairs: list[str]) -> dict[str, float]:
    """vLLM's `--goodput ttft:MS tpot:MS e2el:MS` (pairs may also be comma-separated)."""
    slos: dict[str, float] = {}
    for item in (p for pair in pairs for p in pair.split(",") if p.strip()):
        name, sep, value = item.strip().partition(":")
        try:
            limit = float(value)
        except ValueError:
            limit = -1.0
        if not sep or name not in SLO_METRICS or not limit >= 0:
            raise ValueError(f"bad SLO {item!r}: expected KEY:MILLISECONDS with KEY one of "
                             f"{', '.join(SLO_METRICS)} and a non-negative number")
        slos[name] = limit
    return slos
