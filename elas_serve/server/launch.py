"""`elas-serve serve`: start the engine core (its own process), run uvicorn, drain on SIGTERM.

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

from elas_serve.config import EngineConfig, ServerConfig
from elas_serve.frontend import AsyncLLM, EngineClient

from .app import build_app
from .serving import ServerState

log = logging.getLogger("elas_serve.server")
ABORT_GRACE_SECONDS = 2.0  # for aborted requests to finish after the drain or a second SIGINT


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, client: EngineClient, state: ServerState, shutdown_timeout: float):
        super().__init__(config)
        self.client, self.state, self.shutdown_timeout = client, state, shutdown_timeout
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
        client = self.client
        log.info("draining: %d request(s) in flight, up to %.0f s", client.num_unfinished, self.shutdown_timeout)
        deadline = asyncio.get_running_loop().time() + self.shutdown_timeout
        while client.num_unfinished and asyncio.get_running_loop().time() < deadline and client.dead_error is None:
            await asyncio.sleep(0.05)
        await self._stop()

    async def _stop(self) -> None:
        """Abort what is still in flight (each request ends with "abort", never a 500), give the
        responses a moment to leave, then exit."""
        if self._stopping:
            return
        self._stopping = True
        client = self.client
        if client.num_unfinished:
            log.info("aborting %d request(s) in flight", client.num_unfinished)
        client.abort_all()
        deadline = asyncio.get_running_loop().time() + ABORT_GRACE_SECONDS
        while client.num_unfinished and asyncio.get_running_loop().time() < deadline and client.dead_error is None:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # let aborted responses send their last bytes
        self.should_exit = True


def serve(engine_config: EngineConfig, config: ServerConfig) -> int:
    """Start the engine core (its own process), then the HTTP server; returns the exit code."""
    client = AsyncLLM(engine_config)
    state = ServerState()
    model_name = config.model_name(engine_config)
    app = build_app(client, config, model_name, state)
    info = client.model_info
    log.info("serving %s (%s on %s, FFN backend %s, max_model_len %d, %d KV blocks of %d tokens) on http://%s:%d",
             model_name, info.dtype, info.device, info.ffn_backend, info.max_model_len, info.num_kv_blocks,
             info.block_size, config.host, config.port)
    server = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.uvicorn_log_level,
                                           timeout_graceful_shutdown=5), client, state, config.shutdown_timeout)
    server.run()
    return 0
