"""`elas-serve serve`: load the model, start the engine thread, run uvicorn, drain on SIGTERM.

Shutdown (SIGTERM or SIGINT): stop accepting (new requests get 503, /health too), let in-flight
requests finish for up to `shutdown_timeout` seconds, abort what is left, then exit 0. A second
SIGINT skips the wait: what is in flight is aborted at once (each request still gets its response,
ending with finish_reason "abort"), then the server exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from elas_serve.config import DEFAULT_MAX_CHOICES, EngineConfig
from elas_serve.engine.async_engine import AsyncLLM
from elas_serve.engine.llm_engine import LLMEngine

from .app import DEFAULT_MAX_BODY_BYTES, create_app
from .serving import ServerState

log = logging.getLogger("elas_serve.server")
ABORT_GRACE_SECONDS = 2.0  # for aborted requests to finish after the drain or a second SIGINT


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float):
        super().__init__(config)
        self.state, self.shutdown_timeout = state, shutdown_timeout
        self._tasks: list[asyncio.Task] = []  # the drain, then maybe an immediate stop
        self._stopping = False

    def handle_exit(self, sig: int, frame) -> None:  # called by uvicorn's signal handler
        loop = asyncio.get_event_loop()
        if not self.state.draining:
            self.state.draining = True
            loop.call_soon_threadsafe(lambda: self._tasks.append(loop.create_task(self._drain())))
        elif sig == signal.SIGINT and not self._stopping:  # a second SIGINT: stop waiting
            loop.call_soon_threadsafe(lambda: self._tasks.append(loop.create_task(self._stop())))

    async def _drain(self) -> None:
        llm = self.state.llm
        log.info("draining: %d request(s) in flight, up to %.0f s", llm.num_unfinished, self.shutdown_timeout)
        deadline = asyncio.get_running_loop().time() + self.shutdown_timeout
        while llm.num_unfinished and asyncio.get_running_loop().time() < deadline and not llm.is_dead:
            await asyncio.sleep(0.05)
        await self._stop()

    async def _stop(self) -> None:
        """Abort what is still in flight (each request ends with "abort", never a 500), give the
        responses a moment to leave, then exit."""
        if self._stopping:
            return
        self._stopping = True
        llm = self.state.llm
        if llm.num_unfinished:
            log.info("aborting %d request(s) in flight", llm.num_unfinished)
        llm.abort_all()
        deadline = asyncio.get_running_loop().time() + ABORT_GRACE_SECONDS
        while llm.num_unfinished and asyncio.get_running_loop().time() < deadline and not llm.is_dead:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # let aborted responses send their last bytes
        self.should_exit = True


def serve(config: EngineConfig, host: str, port: int, served_model_name: str, api_key: str | None,
          max_queued_requests: int | None, shutdown_timeout: float = 30.0,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_choices_per_request: int = DEFAULT_MAX_CHOICES) -> int:
    engine = LLMEngine.from_config(config)
    llm = AsyncLLM(engine)
    state = ServerState(llm, served_model_name, max_queued_requests, max_choices_per_request)
    app = create_app(state, api_key, max_body_bytes)
    log.info("serving %s (%s, FFN backend %s, max_model_len %d, %d KV blocks of %d tokens) on http://%s:%d",
             served_model_name, engine.model.output_weight.dtype, engine.ffn_backend, engine.max_model_len,
             engine.block_manager.num_usable_blocks, config.block_size, host, port)
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="info",
                                           timeout_graceful_shutdown=5), state, shutdown_timeout)
    server.run()
    return 0
