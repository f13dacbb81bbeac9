"""One load-test run: arrivals, concurrency, bounds, and the result with vLLM's JSON keys.

Arrivals are open-loop at `request_rate` with inter-arrival times ~ Gamma(shape=burstiness,
scale=1 / (rate * burstiness)) (burstiness 1 = Poisson; rate inf = all at t=0), or closed-loop when
`max_concurrency` caps the requests in flight (rate inf + max_concurrency N = N users sending back
to back). The first request is sent at t=0 and each later one one gap after the previous, as vLLM
sends them. As in vLLM, a request waiting for a concurrency slot is not yet sent: its TTFT starts
when it is sent, and the wait is `client_queue_time`. The run ends after `num_prompts` requests, or
when `duration` seconds have passed: no request is sent after that, the ones in flight finish and
count. Arrivals and prompts depend only on the seed, so every server sees the same load.

Backends (vLLM's names): `openai` and `vllm` stream `POST /v1/completions`; `openai-chat`
streams `POST /v1/chat/completions` with the prompt as one user message.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm.auto import tqdm

from .client import LoadTestError, make_client, scrape_metrics, server_info, stream_completion
from .dataset import PromptsFile, RandomDataset, SampleRequest, read_sharegpt, sample_sharegpt
from .metrics import METRICS, RequestResult
from .report import build_result
from .tokens import make_tokenizer

BACKENDS = ("openai", "vllm", "openai-chat")
DATASETS = ("random", "sharegpt", "custom")
CHAT_ENDPOINT, COMPLETIONS_ENDPOINT = "/v1/chat/completions", "/v1/completions"


@dataclass
class LoadConfig:
    base_url: str
    model: str | None = None
    served_model_name: str | None = None  # the "model" sent in requests (default: model)
    backend: str = "openai"
    endpoint: str | None = None  # None: /v1/chat/completions for openai-chat, else /v1/completions
    num_prompts: int = 1000
    duration: float | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    dataset_name: str | None = None  # None: custom with a dataset_path, else random
    dataset_path: Path | None = None
    tokenizer: str | None = None  # a local tokenizer.json (None: the server's /tokenize)
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    random_prefix_len: int = 0
    sharegpt_output_len: int | None = None
    custom_output_len: int = 256
    disable_shuffle: bool = False
    ignore_eos: bool = False  # forced on for random prompts, so lengths hold (as vLLM)
    sampling: dict[str, float] = field(default_factory=dict)
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    request_id_prefix: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
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
        if self.dataset_name is None:
            self.dataset_name = "custom" if self.dataset_path is not None else "random"
        if self.endpoint is None:
            self.endpoint = CHAT_ENDPOINT if self.backend == "openai-chat" else COMPLETIONS_ENDPOINT
        chat_endpoint = self.endpoint.endswith("chat/completions")
        checks = [
            (self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}"),
            (self.dataset_name in DATASETS,
             f"--dataset-name must be one of {', '.join(DATASETS)}, got {self.dataset_name!r}"),
            (self.dataset_name == "random" or self.dataset_path is not None,
             f"--dataset-name {self.dataset_name} needs --dataset-path"),
            (self.dataset_name != "random" or self.dataset_path is None,
             "--dataset-path is for --dataset-name sharegpt or custom, not random"),
            (self.num_prompts >= 1, f"--num-prompts must be at least 1, got {self.num_prompts}"),
            (self.duration is None or self.duration > 0, f"--duration must be positive, got {self.duration}"),
            (self.request_rate > 0,
             f"--request-rate must be positive (inf: all at once), got {self.request_rate}"),
            (self.burstiness > 0, f"--burstiness must be positive, got {self.burstiness}"),
            (self.max_concurrency is None or self.max_concurrency >= 1,
             f"--max-concurrency must be at least 1, got {self.max_concurrency}"),
            (min(self.random_input_len, self.random_output_len, self.custom_output_len) >= 1,
             "--random-input-len, --random-output-len and --custom-output-len must be at least 1"),
            (self.random_prefix_len >= 0, f"--random-prefix-len must be >= 0, got {self.random_prefix_len}"),
            (self.sharegpt_output_len is None or self.sharegpt_output_len >= 1,
             f"--sharegpt-output-len must be at least 1, got {self.sharegpt_output_len}"),
            (0 <= self.random_range_ratio < 1,
             f"--random-range-ratio must be in [0, 1), got {self.random_range_ratio}"),
            (self.num_warmups >= 0, f"--num-warmups must be >= 0, got {self.num_warmups}"),
            (self.request_timeout > 0, f"--request-timeout must be positive, got {self.request_timeout}"),
            (set(self.percentile_metrics) <= set(METRICS),
             f"--percentile-metrics takes {','.join(METRICS)}, got {','.join(self.percentile_metrics)}"),
            (all(0 <= p <= 100 for p in self.metric_percentiles), "--metric-percentiles must be within [0, 100]"),
            (self.endpoint.endswith("completions") and chat_endpoint == (self.backend == "openai-chat"),
             f"--backend {self.backend} needs " + ("a chat completions endpoint (/v1/chat/completions)"
                                                  if self.backend == "openai-chat" else
                                                  "a text completions endpoint (/v1/completions)")
             + f", got --endpoint {self.endpoint}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.dataset_name == "random":
            self.ignore_eos = True

    @property
    def chat(self) -> bool:
        return self.backend == "openai-chat"


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Send times (s from the start) of n requests: the first at 0, then cumulative Gamma gaps."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng([seed, 1]).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


async def make_samples(cfg: LoadConfig, client: httpx.AsyncClient, info) -> tuple[list[SampleRequest], str]:
    """num_prompts + num_warmups requests (warm-ups last), and the tokenizer's id for the result."""
    n = cfg.num_prompts + cfg.num_warmups
    tokenizer, note = make_tokenizer(cfg.tokenizer, client, cfg.base_url, info.model)
    if note:
        print(f"elas-loadtest: {note}")
    tokenizer_id = cfg.tokenizer or info.model
    if cfg.dataset_name == "sharegpt":
        samples = await sample_sharegpt(read_sharegpt(cfg.dataset_path), tokenizer, n, cfg.seed,
                                        cfg.sharegpt_output_len, info.max_model_len, not cfg.disable_shuffle)
        return samples, tokenizer_id
    if cfg.dataset_name == "custom":
        data = PromptsFile(cfg.dataset_path, cfg.custom_output_len)
        samples = [data[i] for i in range(n)]
        if cfg.chat and any(not isinstance(s.prompt, str) for s in samples):
            raise ValueError("--backend openai-chat sends text: the prompts file has token-id prompts")
        return samples, tokenizer_id
    if info.vocab_size is None:
        raise LoadTestError("the server has no /tokenizer_info with vocab_size to draw random token ids "
                            "from; give prompts with --dataset-name custom --dataset-path FILE")
    data = RandomDataset(info.vocab_size, info.special_ids, cfg.random_input_len, cfg.random_output_len,
                         cfg.random_range_ratio, cfg.seed, cfg.random_prefix_len)
    if info.max_model_len is not None and data.max_total_len > info.max_model_len:
        raise ValueError(f"prompts of up to {data.max_total_len - data.output_range[1]} plus "
                         f"{data.output_range[1]} output tokens exceed the server's max_model_len "
                         f"{info.max_model_len}: lower --random-input-len, --random-prefix-len or "
                         "--random-output-len")
    samples = [data[i] for i in range(n)]
    if cfg.chat:  # NOTE: chat takes text: the ids are detokenized (lengths then count template tokens too)
        texts = await tokenizer.decode([s.prompt for s in samples])
        samples = [SampleRequest(t, -1, s.output_len) for t, s in zip(texts, samples)]
    return samples, tokenizer_id


class _Runner:
    def __init__(self, cfg: LoadConfig, client: httpx.AsyncClient, model: str):
        self.cfg, self.client, self.model = cfg, client, cfg.served_model_name or model
        self.url = cfg.base_url + cfg.endpoint
        self.sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        self.num_sent = 0

    def payload(self, s: SampleRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "stream": True, "stream_options": {"include_usage": True}}
        if self.cfg.chat:
            body.update(messages=[{"role": "user", "content": s.prompt}], max_completion_tokens=s.output_len)
        else:
            body.update(prompt=s.prompt, max_tokens=s.output_len)
        if self.cfg.ignore_eos:
            body["ignore_eos"] = True
        return {**body, **self.cfg.sampling, **self.cfg.extra_body}

    async def send(self, s: SampleRequest, deadline: float = math.inf, pbar: tqdm | None = None
                   ) -> RequestResult | None:
        """One request, after its concurrency slot; None when the slot came after the deadline."""
        arrival = time.perf_counter()
        headers = dict(self.cfg.headers)
        if self.cfg.request_id_prefix:
            headers["x-request-id"] = f"{self.cfg.request_id_prefix}{self.num_sent}"
        self.num_sent += 1
        if self.sem is not None:
            await self.sem.acquire()
        try:
            if time.perf_counter() >= deadline:
                return None
            result = RequestResult(prompt_len=s.prompt_len, client_queue_time=time.perf_counter() - arrival)
            await stream_completion(self.client, self.url, self.payload(s), result, self.cfg.chat, headers)
        finally:
            if self.sem is not None:
                self.sem.release()
        if pbar is not None:
            pbar.update(1)
        return result

    async def run(self, samples: list[SampleRequest]) -> tuple[list[RequestResult], float]:
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
            tasks.append(asyncio.create_task(self.send(samples[i], deadline, pbar)))
        results = [r for r in await asyncio.gather(*tasks) if r is not None]
        duration = time.perf_counter() - start
        pbar.close()
        return results, duration


async def run_benchmark(cfg: LoadConfig) -> dict[str, Any]:
    """Run the load test described by `cfg`; the result dict (vLLM's keys plus ours)."""
    async with make_client(cfg.request_timeout) as client:
        info = await server_info(client, cfg.base_url, cfg.model)
        samples, tokenizer_id = await make_samples(cfg, client, info)
        runner = _Runner(cfg, client, info.model)
        if cfg.num_warmups:
            warm = await asyncio.gather(*(runner.send(s) for s in samples[cfg.num_prompts:]))
            if not any(r.success for r in warm):
                raise LoadTestError(f"every warm-up request failed: {warm[0].error}")
        before = await scrape_metrics(client, cfg.base_url)
        results, duration = await runner.run(samples)
        after = await scrape_metrics(client, cfg.base_url)
    return build_result(cfg, info.model, tokenizer_id, results, duration, before, after)

