"""AsyncLLM: the engine's step loop on a background thread, one async stream per request.

Only the engine thread touches engine state. Other threads (the server's event loop) validate a
request with `LLMEngine.make_request` (pure), then post it; aborts are posted too and applied
before the next step, so an aborted request's blocks are free within one step. A step that fails
fails only its own requests (their streams raise `RequestFailedError`; the engine logs it). After
`MAX_CONSECUTIVE_FAILED_STEPS` failed steps in a row the engine is dead: the log says why, every
open stream gets `EngineDeadError` and new requests are refused (/health answers 503).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from elas_serve.sampling_params import SamplingParams

from .llm_engine import LLMEngine
from .request import Request, RequestOutput

MAX_CONSECUTIVE_FAILED_STEPS = 3
log = logging.getLogger("elas_serve.engine")


class EngineDeadError(RuntimeError):
    pass


class RequestFailedError(RuntimeError):
    """The engine could not serve this request (its step failed); other requests are unaffected."""


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wakeup = threading.Event()
        self._stopping = False
        self.error: BaseException | None = None
        self.num_unfinished = 0  # submitted and not yet finished or aborted
        self._count_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="elas-engine", daemon=True)
        self._thread.start()

    @property
    def is_dead(self) -> bool:
        return self.error is not None or not self._thread.is_alive()

    @property
    def num_queued(self) -> int:
        """Requests submitted but not running yet (waiting or still being posted)."""
        return max(self.num_unfinished - len(self.engine.scheduler.running), 0)

    def _post(self, command: tuple) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 (the thread ends: no stream may wait forever)
            log.exception("the engine thread failed")
            self._die(f"the engine thread failed: {e!r}")

    def _loop(self) -> None:
        engine = self.engine
        while not self._stopping:
            while True:
                try:
                    kind, arg = self._commands.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    try:
                        engine.add(arg)
                    except Exception as e:  # noqa: BLE001 (refused: only this request fails)
                        log.exception("request %s could not be added", arg.request_id)
                        self._count(-1)
                        self._deliver(arg.request_id, RequestFailedError(f"the engine refused the request: {e}"))
                else:
                    for request_id in (list(engine.requests) if kind == "abort_all" else [arg]):
                        if (out := engine.abort_request(request_id)) is not None:
                            self._count(-1)
                            self._deliver(request_id, out)  # reaches the stream unless its reader left
            if not engine.has_unfinished_requests():
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = engine.step()
            except Exception:  # noqa: BLE001 (a failure outside the step's own containment)
                log.exception("engine step raised")
                engine.num_consecutive_failed_steps += 1
                outputs = []
            for out in outputs:
                if out.finished:
                    self._count(-1)
                self._deliver(out.request_id, out)
            if engine.num_consecutive_failed_steps >= MAX_CONSECUTIVE_FAILED_STEPS:
                self._die(f"{engine.num_consecutive_failed_steps} engine steps failed in a row")
                return
        self._die("it was shut down", logging.INFO)

    def _die(self, reason: str, level: int = logging.ERROR) -> None:
        self.error = EngineDeadError(f"the engine is not running: {reason}")
        log.log(level, "%s; open requests fail, new ones are refused", self.error)
        for request_id in list(self._streams):
            self._deliver(request_id, self.error)

    def _count(self, delta: int) -> None:
        with self._count_lock:
            self.num_unfinished += delta

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, item)

    def submit(self, req: Request) -> "RequestStream":
        """Post a request built by `LLMEngine.make_request`; iterate the returned stream for its
        outputs and close it when done (closing an unfinished stream aborts the request)."""
        if self.is_dead:
            raise EngineDeadError("the engine is not running")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[req.request_id] = (asyncio.get_running_loop(), q)
        self._count(+1)
        self._post(("add", req))
        return RequestStream(self, req, q)

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Validate, submit and stream one request; leaving the loop early aborts it."""
        stream = self.submit(self.engine.make_request(request_id, prompt, params))
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_id: str, notify: bool = False) -> None:
        """Abort a request. With `notify`, its stream still gets the final "abort" output (the
        server stopping a request); without, the stream is dropped (its reader left)."""
        if not notify:
            self._streams.pop(request_id, None)
        self._post(("abort", request_id))

    def abort_all(self) -> None:
        """Abort every request in the engine; their streams get their final "abort" output."""
        self._post(("abort_all", None))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout)


class RequestStream:
    """The outputs of one submitted request, in order, ending with the finished one."""

    def __init__(self, llm: AsyncLLM, req: Request, q: asyncio.Queue):
        self.llm, self.request, self._q = llm, req, q
        self.finished = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._q.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        if item.finish_reason == "error":
            raise RequestFailedError(item.error)
        return item

    def close(self) -> None:
        """Stop listening; abort the request if it has not finished. Idempotent."""
        self.llm._streams.pop(self.request.request_id, None)
        if not self.finished:
            self.finished = True
            self.llm.abort(self.request.request_id)
