"""One load-test run: arrivals, concurrency, bounds, and the result with vLLM's JSON keys.

Arrivals are open-loop at `request_rate` with inter-arrival times ~ Gamma(shape=burstiness,
scale=1 / (rate * burstiness)) (burstiness 1 = Poisson; rate inf = all at t=0), or closed-loop when
`max_concurrency` caps the requests in flight (rate inf + max_concurrency N = N users sending back
to back). As in vLLM, a request waiting for a concurrency slot is not yet sent: its TTFT starts
when it is sent, and the wait is `client_queue_time`. The run ends after `num_prompts` requests, or
when `duration` seconds have passed: no request is sent after that, the ones in flight finish and
count. Arrivals and prompts depend only on the seed, so every server sees the same load.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm.auto import tqdm

from .client import (
    LoadTestError,
    ServerInfo,
    make_client,
    metrics_delta,
    scrape_metrics,
    server_info,
    stream_completion,
)
from .dataset import PromptsFile, RandomDataset, SampleRequest
from .metrics import METRICS, RequestResult, calculate_metrics, result_fields, tpot


@dataclass
class LoadConfig:
    base_url: str
    model: str | None = None
    endpoint: str = "/v1/completions"
    num_prompts: int = 1000
    duration: float | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    dataset_path: Path | None = None  # None: random token ids
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    custom_output_len: int = 256
    ignore_eos: bool = False  # forced on for random prompts, so lengths hold
    sampling: dict[str, float] = field(default_factory=dict)
    num_warmups: int = 0
    seed: int = 0
    percentile_metrics: list[str] = field(default_factory=lambda: list(METRICS))
    metric_percentiles: list[float] = field(default_factory=lambda: [99.0])
    goodput: dict[str, float] = field(default_factory=dict)
    request_timeout: float = 600.0
    label: str | None = None
    save_detailed: bool = False
    disable_tqdm: bool = False

    def __post_init__(self):
        checks = [
            (self.num_prompts >= 1, f"--num-prompts must be at least 1, got {self.num_prompts}"),
            (self.duration is None or self.duration > 0, f"--duration must be positive, got {self.duration}"),
            (self.request_rate > 0,
             f"--request-rate must be positive (inf: all at once), got {self.request_rate}"),
            (self.burstiness > 0, f"--burstiness must be positive, got {self.burstiness}"),
            (self.max_concurrency is None or self.max_concurrency >= 1,
             f"--max-concurrency must be at least 1, got {self.max_concurrency}"),
            (min(self.random_input_len, self.random_output_len, self.custom_output_len) >= 1,
             "--random-input-len, --random-output-len and --custom-output-len must be at least 1"),
            (0 <= self.random_range_ratio < 1,
             f"--random-range-ratio must be in [0, 1), got {self.random_range_ratio}"),
            (self.num_warmups >= 0, f"--num-warmups must be >= 0, got {self.num_warmups}"),
            (self.request_timeout > 0, f"--request-timeout must be positive, got {self.request_timeout}"),
            (set(self.percentile_metrics) <= set(METRICS),
             f"--percentile-metrics takes {','.join(METRICS)}, got {','.join(self.percentile_metrics)}"),
            (all(0 <= p <= 100 for p in self.metric_percentiles), "--metric-percentiles must be within [0, 100]"),
            (self.endpoint.endswith("completions") and not self.endpoint.endswith("chat/completions"),
             f"--endpoint must be a text completions endpoint, got {self.endpoint}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.dataset_path is None:
            self.ignore_eos = True


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Send times (s from the start) of n requests: cumulative Gamma inter-arrival gaps."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng([seed, 1]).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    return np.cumsum(gaps)


def make_dataset(cfg: LoadConfig, info: ServerInfo) -> RandomDataset | PromptsFile:
    if cfg.dataset_path is not None:
        return PromptsFile(cfg.dataset_path, cfg.custom_output_len)
    if info.vocab_size is None:
        raise LoadTestError("the server has no /tokenizer_info with vocab_size to draw random token ids "
                            "from; give prompts with --dataset-path")
    data = RandomDataset(info.vocab_size, info.special_ids, cfg.random_input_len, cfg.random_output_len,
                         cfg.random_range_ratio, cfg.seed)
    if info.max_model_len is not None and data.max_total_len > info.max_model_len:
        raise ValueError(f"prompts of up to {data.input_range[1]} plus {data.output_range[1]} output tokens "
                         f"exceed the server's max_model_len {info.max_model_len}: lower --random-input-len "
                         "or --random-output-len")
    return data


class _Runner:
    def __init__(self, cfg: LoadConfig, client: httpx.AsyncClient, model: str):
        self.cfg, self.client, self.model = cfg, client, model
        self.url = cfg.base_url + cfg.endpoint
        self.sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

    def payload(self, s: SampleRequest) -> dict[str, Any]:
        body = {"model": self.model, "prompt": s.prompt, "max_tokens": s.output_len, "stream": True,
                "stream_options": {"include_usage": True}, **self.cfg.sampling}
        if self.cfg.ignore_eos:
            body["ignore_eos"] = True
        return body

    async def send(self, s: SampleRequest, deadline: float = math.inf, pbar: tqdm | None = None
                   ) -> RequestResult | None:
        """One request, after its concurrency slot; None when the slot came after the deadline."""
        arrival = time.perf_counter()
        if self.sem is not None:
            await self.sem.acquire()
        try:
            if time.perf_counter() >= deadline:
                return None
            result = RequestResult(prompt_len=s.prompt_len, client_queue_time=time.perf_counter() - arrival)
            await stream_completion(self.client, self.url, self.payload(s), result)
        finally:
            if self.sem is not None:
                self.sem.release()
        if pbar is not None:
            pbar.update(1)
        return result

    async def run(self, dataset: RandomDataset | PromptsFile) -> tuple[list[RequestResult], float]:
        cfg = self.cfg
        offsets = arrival_offsets(cfg.num_prompts, cfg.request_rate, cfg.burstiness, cfg.seed)
        pbar = tqdm(total=cfg.num_prompts, desc="requests", unit="req", disable=cfg.disable_tqdm)
        start = time.perf_counter()
        deadline = start + cfg.duration if cfg.duration else math.inf
        tasks = []
        for i in range(cfg.num_prompts):
            send_at = start + float(offsets[i])
            if send_at >= deadline:
                break
            if (delay := send_at - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.send(dataset[i], deadline, pbar)))
        results = [r for r in await asyncio.gather(*tasks) if r is not None]
        duration = time.perf_counter() - start
        pbar.close()
        return results, duration


async def run_benchmark(cfg: LoadConfig) -> dict[str, Any]:
    """Run the load test described by `cfg`; the result dict (vLLM's keys plus ours)."""
    async with make_client(cfg.request_timeout) as client:
        info = await server_info(client, cfg.base_url, cfg.model)
        dataset = make_dataset(cfg, info)
        runner = _Runner(cfg, client, info.model)
        if cfg.num_warmups:
            warm = await asyncio.gather(*(runner.send(dataset[cfg.num_prompts + j]) for j in range(cfg.num_warmups)))
            if not any(r.success for r in warm):
                raise LoadTestError(f"every warm-up request failed: {warm[0].error}")
        before = await scrape_metrics(client, cfg.base_url)
        results, duration = await runner.run(dataset)
        after = await scrape_metrics(client, cfg.base_url)
    metrics = calculate_metrics(results, duration, cfg.metric_percentiles, cfg.goodput or None)
    result: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "endpoint_type": "openai", "backend": "openai",
        "label": cfg.label, "model_id": info.model, "tokenizer_id": None, "num_prompts": cfg.num_prompts,
        "request_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate,
        "burstiness": cfg.burstiness, "max_concurrency": cfg.max_concurrency,
        **result_fields(metrics, cfg.percentile_metrics, cfg.metric_percentiles),
        "base_url": cfg.base_url, "duration_limit": cfg.duration, "seed": cfg.seed,
        "dataset": str(cfg.dataset_path) if cfg.dataset_path else "random",
        "random_input_len": cfg.random_input_len, "random_output_len": cfg.random_output_len,
        "random_range_ratio": cfg.random_range_ratio, "goodput_slos_ms": cfg.goodput or None,
        "server_ffn_backend": _ffn_backend(after),
        "server_metrics_delta": metrics_delta(before, after)}
    if cfg.save_detailed:
        result.update({"input_lens": [r.prompt_len for r in results], "output_lens": [r.output_len for r in results],
                       "ttfts": [r.ttft for r in results], "tpots": [tpot(r) for r in results],
                       "itls": [r.itl for r in results], "latencies": [r.latency for r in results],
                       "start_times": [r.start_time for r in results],
                       "queue_times": [r.client_queue_time for r in results],
                       "errors": [r.error for r in results], "generated_texts": [r.generated_text for r in results]})
    return result


def _ffn_backend(samples: dict[str, float] | None) -> str | None:
    for key, value in (samples or {}).items():
        if key.startswith("elas:ffn_backend_info{") and value == 1:
            return key.split('backend="', 1)[1].split('"', 1)[0]
    return None
