"""AsyncLLM: the `EngineClient` of the HTTP server, on its event loop.

The engine core runs in a child process (`MPCoreClient`, the default) or on a thread
(`InprocCoreClient`); either way its outputs arrive on a thread of theirs and are handed to the
event loop, where the `OutputProcessor` turns them into per-prompt streams. Everything here runs
on the loop: submitting (one engine request per completion), aborting (a stream closed early),
processing outputs, publishing stats. If the core dies, every open stream gets `EngineDeadError`
at once and new requests are refused.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator

from elas_serve.config import EngineConfig
from elas_serve.engine.core_client import InprocCoreClient, MPCoreClient
from elas_serve.engine.messages import EngineCoreOutputs, SchedulerStats
from elas_serve.outputs import RequestOutput
from elas_serve.sampling_params import SamplingParams
from elas_serve.tokenizer import Tokenizer

from .output_processor import OutputProcessor
from .processor import InputProcessor, PreparedPrompt
from .protocol import (
    EngineClient,
    EngineDeadError,
    FinishedRequestStats,
    IterationStats,
    RequestFailedError,
    RequestStream,
    StatLogger,
)

log = logging.getLogger("elas_serve.frontend")


class AsyncLLM(EngineClient):
    def __init__(self, config: EngineConfig, multiprocess: bool = True, core=None):
        """The core from `config` in a child process (or on a thread); or an `EngineCore` given
        as `core`, driven on a thread of this process."""
        self.config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        if core is None and not multiprocess:
            from elas_serve.engine.core import EngineCore
            core = EngineCore.from_config(config)
        self.core_client = MPCoreClient(config, self._on_outputs) if core is None else \
            InprocCoreClient(core, self._on_outputs)
        self.model_info = self.core_client.model_info
        self.tokenizer = Tokenizer.from_path(config.tokenizer or config.model, self.model_info.eos_token_ids)
        self.processor = InputProcessor(self.tokenizer, self.model_info)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._streams: dict[str, asyncio.Queue] = {}
        self._stats = SchedulerStats()
        self._loggers: list[StatLogger] = []
        self._dead: EngineDeadError | None = None
        self._ids = itertools.count()

    # ------------------------------------------------------------------ EngineClient

    async def prepare(self, prompts: list[str | list[int]], params: SamplingParams) -> list[PreparedPrompt]:
        return await self.processor.prepare_async(prompts, params)

    def submit(self, prompt: PreparedPrompt, params: SamplingParams, request_id: str | None = None) -> "_Stream":
        if self._dead is not None:
            raise self._dead
        self._loop = asyncio.get_running_loop()
        request_id = request_id or f"{uuid.uuid4().hex[:12]}-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        arrival = time.monotonic()
        self.output_processor.add(request_id, prompt, params, arrival)
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        for req in self.processor.make_requests(prompt, params, request_id, arrival):
            self.core_client.send("add", req)
        return _Stream(self, request_id, q)

    def abort(self, request_id: str) -> None:
        """Stop listening to a prompt's stream; its unfinished completions are aborted in the core."""
        self._streams.pop(request_id, None)
        running, finished = self.output_processor.abort(request_id)
        if running:
            self.core_client.send("abort", running)
        if finished:
            self._publish_finished(finished)

    def abort_all(self) -> None:
        self.core_client.send("abort_all")

    @property
    def stats(self) -> SchedulerStats:
        return self._stats

    @property
    def num_unfinished(self) -> int:
        return self.output_processor.num_unfinished

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self._dead

    def add_stat_logger(self, logger: StatLogger) -> None:
        self._loggers.append(logger)

    def shutdown(self) -> None:
        self.core_client.shutdown()
        self._fail_all(EngineDeadError("the engine is not running: it was shut down"))

    # ------------------------------------------------------------------ outputs

    def _on_outputs(self, batch: EngineCoreOutputs) -> None:
        """From the core client's thread: hand the batch to the event loop."""
        if batch.dead is not None:
            self._dead = EngineDeadError(f"the engine is not running: {batch.dead}")
            log.error("%s; open requests fail, new ones are refused", self._dead)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._process, batch)

    def _process(self, batch: EngineCoreOutputs) -> None:
        result = self.output_processor.process(batch)
        self._stats = batch.stats
        for parent, out in result.outputs:
            if (q := self._streams.get(parent.request_id)) is not None:
                q.put_nowait(out)
            if out.finished:
                self._streams.pop(parent.request_id, None)
        for parent in result.failed:
            if (q := self._streams.pop(parent.request_id, None)) is not None:
                q.put_nowait(RequestFailedError(parent.error))
        if result.to_abort:
            self.core_client.send("abort", result.to_abort)
        for logger in self._loggers:
            logger.record(result.stats)
        if batch.dead is not None:
            self._fail_all(self._dead)

    def _publish_finished(self, finished: list[FinishedRequestStats]) -> None:
        for logger in self._loggers:
            logger.record(IterationStats(None, finished=finished))

    def _fail_all(self, error: EngineDeadError) -> None:
        for request_id, q in list(self._streams.items()):
            q.put_nowait(error)
            self.output_processor.abort(request_id)
        self._streams.clear()


class _Stream(RequestStream):
    def __init__(self, llm: AsyncLLM, request_id: str, q: asyncio.Queue):
        self.llm, self.request_id, self._q = llm, request_id, q
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._q.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.llm.abort(self.request_id)
