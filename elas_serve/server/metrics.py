"""Prometheus metrics (design section 6): vLLM's names with the `elas:` prefix, label `model_name`;
and the periodic stats line of the log (`LoggingStatLogger`).

A `StatLogger` of the engine client: counters and histograms are fed from the statistics the
front end publishes with every batch of core outputs (`IterationStats`); gauges read the client's
latest published snapshot at scrape time. Nothing here reads engine internals.
Latency buckets start at 0.5 ms: a small model decodes a token in a few milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from elas_serve.frontend import EngineClient, IterationStats

FAST_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
                0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0,
                   2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
FINISH_REASONS = ("stop", "length", "abort", "error")
log = logging.getLogger("elas_serve.server")
STEP_PHASES = ("schedule", "forward", "output")


class PrometheusMetrics:
    def __init__(self, client: EngineClient, model_name: str):
        self.registry = registry = CollectorRegistry()
        labels = {"model_name": model_name}
        m = ["model_name"]

        def gauge(name: str, doc: str, fn) -> None:
            Gauge(name, doc, m, registry=registry).labels(**labels).set_function(fn)

        gauge("elas:num_requests_running", "Requests in model execution batches.", lambda: client.stats.num_running)
        gauge("elas:num_requests_waiting", "Requests waiting to be scheduled.", lambda: client.num_queued)
        gauge("elas:kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent.", lambda: client.stats.kv_cache_usage)

        def counter(name: str, doc: str):
            return Counter(name, doc, m, registry=registry).labels(**labels)

        self.prompt_tokens = counter("elas:prompt_tokens", "Prefilled prompt tokens (each of n samples).")
        self.generation_tokens = counter("elas:generation_tokens", "Generated tokens.")
        self.preemptions = counter("elas:num_preemptions", "Preemptions (recompute) of running requests.")
        self.prefix_queries = counter("elas:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("elas:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        success = Counter("elas:request_success", "Finished requests by reason.", m + ["finished_reason"],
                          registry=registry)
        self.by_replica = Counter("elas:replica_requests", "Finished requests by the engine replica that served "
                                  "them (Ray Serve).", m + ["replica"], registry=registry)
        self.model_name = model_name
        self.success = {r: success.labels(finished_reason=r, **labels) for r in FINISH_REASONS}

        def histogram(name: str, doc: str, buckets):
            return Histogram(name, doc, m, buckets=buckets, registry=registry).labels(**labels)

        self.ttft = histogram("elas:time_to_first_token_seconds", "Time to first token.", REQUEST_BUCKETS)
        self.itl = histogram("elas:inter_token_latency_seconds", "Time between two tokens of a request.",
                             FAST_BUCKETS)
        self.e2e = histogram("elas:e2e_request_latency_seconds", "Arrival to finish.", REQUEST_BUCKETS)
        self.queue = histogram("elas:request_queue_time_seconds", "Arrival to first scheduled.", REQUEST_BUCKETS)
        self.prefill = histogram("elas:request_prefill_time_seconds", "First scheduled to first token.",
                                 REQUEST_BUCKETS)
        self.decode = histogram("elas:request_decode_time_seconds", "First token to last token.",
                                REQUEST_BUCKETS)
        step = Histogram("elas:step_seconds", "Engine step time by phase (schedule, forward, output).",
                         m + ["phase"], buckets=FAST_BUCKETS, registry=registry)
        self.step = {p: step.labels(phase=p, **labels) for p in STEP_PHASES}
        Gauge("elas:ffn_backend_info", "The FFN backend serving this model (value 1).", m + ["backend"],
              registry=registry).labels(backend=client.model_info.ffn_backend, **labels).set(1)
        self.density = Gauge("elas:ffn_activation_density",
                             "Sampled fraction of non-zeros after squared ReLU, before 2:4.", m,
                             registry=registry).labels(**labels)

    def record(self, stats: IterationStats) -> None:
        if (s := stats.scheduler) is not None:
            self.prompt_tokens.inc(s.num_prompt_tokens)
            self.generation_tokens.inc(s.num_generation_tokens)
            self.preemptions.inc(s.num_preemptions)
            self.prefix_queries.inc(s.num_prefix_queried_tokens)
            self.prefix_hits.inc(s.num_prefix_hit_tokens)
            for phase, seconds in (s.step_seconds or {}).items():
                self.step[phase].observe(seconds)
            if s.ffn_activation_density is not None:
                self.density.set(s.ffn_activation_density)
        for value in stats.ttfts:
            self.ttft.observe(value)
        for value in stats.itls:
            self.itl.observe(value)
        for f in stats.finished:
            self.success[f.finish_reason].inc()
            if f.engine is not None:
                self.by_replica.labels(model_name=self.model_name, replica=f.engine).inc()
            self.e2e.observe(f.e2e)
            if f.queue is not None:
                self.queue.observe(f.queue)
            if f.prefill is not None:
                self.prefill.observe(f.prefill)
            if f.decode is not None:
                self.decode.observe(f.decode)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LoggingStatLogger:
    """vLLM's periodic stats line: prompt and generation throughput over the last interval,
    running and waiting requests, KV-cache usage, prefix-cache hit rate (since start)."""

    def __init__(self, client: EngineClient, interval: float):
        self.client, self.interval = client, interval
        self.last = time.monotonic()
        self.prompt_tokens = self.generation_tokens = 0
        self.prefix_queries = self.prefix_hits = 0

    def record(self, stats: IterationStats) -> None:
        if (s := stats.scheduler) is not None:
            self.prompt_tokens += s.num_prompt_tokens
            self.generation_tokens += s.num_generation_tokens
            self.prefix_queries += s.num_prefix_queried_tokens
            self.prefix_hits += s.num_prefix_hit_tokens

    async def run(self) -> None:
        """Every `interval` seconds, a line, if anything was served since the last one."""
        while True:
            await asyncio.sleep(self.interval)
            if self.prompt_tokens or self.generation_tokens or self.client.num_unfinished:
                self.log(time.monotonic())

    def log(self, now: float) -> None:
        elapsed, snap = now - self.last, self.client.stats
        hit_rate = self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
        log.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d reqs, "
                 "Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
                 self.prompt_tokens / elapsed, self.generation_tokens / elapsed, snap.num_running,
                 self.client.num_queued, 100 * snap.kv_cache_usage, 100 * hit_rate)
        self.last, self.prompt_tokens, self.generation_tokens = now, 0, 0


router = APIRouter()


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
async def metrics(request: HTTPRequest):
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
