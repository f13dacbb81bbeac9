"""The one interface the HTTP server sees of the engine: `EngineClient` (vLLM's name), its errors,
and the statistics it publishes to stat loggers (Prometheus lives in the server).

A server holds an `EngineClient` and nothing else of the engine: it prepares prompts
(tokenized and checked off the event loop), submits them (`n` completions per prompt come back as
one stream), aborts, and reads the model's facts, the tokenizer, health and a stats snapshot that
the core publishes after every step.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from elas_serve.engine.messages import ModelInfo, SchedulerStats
from elas_serve.outputs import RequestOutput
from elas_serve.sampling_params import SamplingParams
from elas_serve.tokenizer import Tokenizer

from .processor import PreparedPrompt


class EngineDeadError(RuntimeError):
    """The engine is not running (it failed, or the server is shutting down)."""


class RequestFailedError(RuntimeError):
    """The engine could not serve this request (its step failed); other requests are unaffected."""


@dataclass(slots=True)
class FinishedRequestStats:
    """One engine request (one of `n`) at its end, timed by the front end."""

    finish_reason: str  # stop | length | abort | error
    e2e: float  # arrival to finish
    queue: float | None  # arrival to first scheduled
    prefill: float | None  # first scheduled to first token
    decode: float | None  # first token to last token
    num_prompt_tokens: int
    num_generation_tokens: int
    engine: str | None = None  # which engine replica served it, when there are several


@dataclass(slots=True)
class IterationStats:
    """What one batch of core outputs meant to the front end (`scheduler`: the core's snapshot
    with it; None for what the front end did alone, such as aborting a stream whose reader left)."""

    scheduler: SchedulerStats | None
    ttfts: list[float] = field(default_factory=list)
    itls: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)


class StatLogger(Protocol):
    def record(self, stats: IterationStats) -> None: ...


class RequestStream(abc.ABC):
    """The outputs of one submitted prompt, in order, the last with `finished`; raises
    `RequestFailedError` or `EngineDeadError`. Closing it before the end aborts the request."""

    request_id: str

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class EngineClient(abc.ABC):
    model_info: ModelInfo
    tokenizer: Tokenizer

    @abc.abstractmethod
    async def prepare(self, prompts: list[str | list[int]], params: SamplingParams) -> list[PreparedPrompt]:
        """Tokenize and check prompts (raises `InvalidRequestError` naming the prompt); large ones
        off the event loop."""

    @abc.abstractmethod
    def submit(self, prompt: PreparedPrompt, params: SamplingParams, request_id: str | None = None
               ) -> RequestStream:
        """Start one prompt's `params.n` completions now (no await: callers check admission and
        submit atomically)."""

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Prepare, submit and stream one prompt; leaving the loop early aborts it."""
        stream = self.submit((await self.prepare([prompt], params))[0], params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    @abc.abstractmethod
    def abort_all(self) -> None:
        """Abort every request; each stream ends with its completions' "abort" outputs."""

    @property
    @abc.abstractmethod
    def stats(self) -> SchedulerStats:
        """The core's latest published snapshot (gauges as of its last step)."""

    @property
    @abc.abstractmethod
    def num_unfinished(self) -> int:
        """Engine requests (each of n) submitted and not finished."""

    @property
    def num_queued(self) -> int:
        """Engine requests submitted and not running yet."""
        return max(self.num_unfinished - self.stats.num_running, 0)

    @property
    @abc.abstractmethod
    def dead_error(self) -> EngineDeadError | None:
        """Why the engine stopped serving, or None while it serves."""

    @abc.abstractmethod
    def add_stat_logger(self, logger: StatLogger) -> None: ...

    @abc.abstractmethod
    def shutdown(self) -> None: ...
