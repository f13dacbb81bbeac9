"""A real uvicorn server on loopback, in a background thread of the test process (so tests can
also look at the engine's state), `elas-serve serve` as a real process, and Prometheus text
parsing."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from elas_serve.clients.process import free_port
from elas_serve.config import EngineConfig, ServerConfig
from elas_serve.engine.core import EngineCore
from elas_serve.frontend import AsyncLLM
from elas_serve.models import load_model
from elas_serve.server.app import build_app
from elas_serve.server.serving import ServerState

MODEL_NAME = "elas-test"


class ServerThread:
    """The app over an engine core on a thread of this process (`AsyncLLM(core=...)`), so that
    tests can reach into the core (slow it down, inject faults); `start` runs the real process."""

    def __init__(self, ckpt: Path, api_key: str | None = None, max_queued_requests: int | None = None,
                 max_body_bytes: int = 1 << 20, step_delay: float = 0.0, max_choices_per_request: int = 1024,
                 **engine_kwargs):
        config = EngineConfig(model=ckpt, **engine_kwargs)
        core = EngineCore(load_model(ckpt), config)
        if step_delay:  # a slower model: long generations stay in flight long enough to act on
            execute = core.runner.execute

            def slow_execute(*args, **kwargs):
                time.sleep(step_delay)
                return execute(*args, **kwargs)
            core.runner.execute = slow_execute
        self.engine = core
        self.llm = AsyncLLM(config, core=core)
        server_config = ServerConfig(api_key=api_key, max_queued_requests=max_queued_requests,
                                     max_request_bytes=max_body_bytes, max_choices_per_request=max_choices_per_request)
        self.state = ServerState()
        app = build_app(self.llm, server_config, MODEL_NAME, self.state)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(f"{self.url}/metrics").text)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once no request is in flight and no KV block is in use (as the core last published)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.llm.num_unfinished == 0 and self.llm.stats.kv_cache_usage == 0 and self.llm.stats.num_running == 0:
                return True
            time.sleep(0.02)
        return False


def parse_metrics(text: str) -> dict[str, float]:
    """`{'name{labels}': value}` for every sample line (labels as exposed, sorted by the exporter)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = re.match(r"^(\S+?(?:\{.*\})?)\s+(\S+)$", line)
            if m:
                samples[m.group(1)] = float(m.group(2))
    return samples


def start(ckpt, *args, name: str = "m", timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """`elas-serve serve` on a free port, once /health answers 200; its output is piped."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "elas_serve.cli", "serve", "--model", str(ckpt),
                             "--port", str(port), "--served-model-name", name, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")
