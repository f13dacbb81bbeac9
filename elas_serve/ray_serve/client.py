"""RayEngineClient: the `EngineClient` of the Ray Serve ingress, over N engine replicas.

The ingress runs the same HTTP server as `elas-serve serve` (`server.app.build_app`) over this
client: prompts are prepared here (tokenized and checked once, with the ingress's tokenizer), then
each prompt goes to one replica (`EngineReplica.generate`, a streaming call through a Ray Serve
handle whose router picks the replica by load and prefix), and its outputs stream back. A replica
that dies ends its in-flight streams with `RequestFailedError`, never a hang; Ray Serve replaces
it. Stats: gauges sum the replicas' published snapshots (the routing stats); latency statistics
are timed here, as the client sees them.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator

from elas_serve.engine.messages import ModelInfo, SchedulerStats
from elas_serve.frontend.processor import InputProcessor, PreparedPrompt
from elas_serve.frontend.protocol import (
    EngineClient,
    EngineDeadError,
    FinishedRequestStats,
    IterationStats,
    RequestFailedError,
    RequestStream,
    StatLogger,
)
from elas_serve.outputs import RequestOutput
from elas_serve.sampling_params import SamplingParams
from elas_serve.tokenizer import Tokenizer

log = logging.getLogger("elas_serve.ray_serve")


class RayEngineClient(EngineClient):
    def __init__(self, handle, model_info: ModelInfo, tokenizer: Tokenizer):
        self.handle, self.model_info, self.tokenizer = handle, model_info, tokenizer
        self.processor = InputProcessor(tokenizer, model_info)
        self._loggers: list[StatLogger] = []
        self._streams: set[_RayStream] = set()
        self._ids = itertools.count()
        self.replica_stats: dict[str, SchedulerStats] = {}

    async def prepare(self, prompts: list[str | list[int]], params: SamplingParams) -> list[PreparedPrompt]:
        return await self.processor.prepare_async(prompts, params)

    def submit(self, prompt: PreparedPrompt, params: SamplingParams, request_id: str | None = None) -> "_RayStream":
        request_id = request_id or f"{uuid.uuid4().hex[:12]}-{next(self._ids)}"
        gen = self.handle.options(stream=True).generate.remote(prompt, params, request_id)
        stream = _RayStream(self, request_id, gen, params.n, len(prompt.prompt_token_ids))
        self._streams.add(stream)
        return stream

    def abort_all(self) -> None:
        for stream in list(self._streams):
            stream.close()

    @property
    def stats(self) -> SchedulerStats:
        snaps = list(self.replica_stats.values())
        return SchedulerStats(num_running=sum(s.num_running for s in snaps),
                              num_waiting=sum(s.num_waiting for s in snaps),
                              kv_cache_usage=sum(s.kv_cache_usage for s in snaps) / max(len(snaps), 1))

    @property
    def num_unfinished(self) -> int:
        return sum(s.n for s in self._streams)

    @property
    def dead_error(self) -> EngineDeadError | None:
        return None  # NOTE: Ray Serve replaces dead replicas; their requests fail one by one

    def add_stat_logger(self, logger: StatLogger) -> None:
        self._loggers.append(logger)

    def shutdown(self) -> None:
        self.abort_all()

    def _record(self, stats: IterationStats) -> None:
        for logger in self._loggers:
            logger.record(stats)


class _RayStream(RequestStream):
    def __init__(self, client: RayEngineClient, request_id: str, gen, n: int, num_prompt_tokens: int):
        self.client, self.request_id, self.gen, self.n = client, request_id, gen, n
        self.num_prompt_tokens = num_prompt_tokens
        self.arrival, self.first, self.last = time.monotonic(), None, None
        self.tokens: dict[int, int] = {}  # completion index -> tokens so far
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            replica, out, snapshot = await self.gen.__anext__()
        except Exception as e:  # noqa: BLE001 (the replica failed the request, or died: RayActorError and kin)
            self._fail()
            if isinstance(e, (RequestFailedError, EngineDeadError)):
                raise RequestFailedError(str(e)) from None
            log.warning("request %s failed on its replica: %r", self.request_id, e)
            raise RequestFailedError(f"the engine replica serving this request failed: {type(e).__name__}") from None
        self.client.replica_stats[replica] = snapshot
        now, stats = time.monotonic(), IterationStats(None)
        for c in out.outputs:
            if c.token_ids:
                if self.first is None:
                    self.first = now
                    stats.ttfts.append(now - self.arrival)
                else:
                    stats.itls.append(now - self.last)
                self.last = now
            self.tokens[c.index] = self.tokens.get(c.index, 0) + len(c.token_ids)
            if c.finish_reason is not None:
                stats.finished.append(FinishedRequestStats(
                    c.finish_reason, now - self.arrival, None, None,
                    None if self.first is None else self.last - self.first, self.num_prompt_tokens,
                    self.tokens[c.index], engine=replica))
        if out.finished:
            self.finished = True
            self.client._streams.discard(self)
        self.client._record(stats)
        return out

    def _fail(self, reason: str = "error") -> None:
        self.finished = True
        self.client._streams.discard(self)
        ended = FinishedRequestStats(reason, time.monotonic() - self.arrival, None, None, None,
                                     self.num_prompt_tokens, 0)
        self.client._record(IterationStats(None, finished=[ended] * self.n))

    def close(self) -> None:
        if not self.finished:
            self._fail("abort")
            self.gen.cancel()  # NOTE: cancels the replica's generator, which aborts the request there
