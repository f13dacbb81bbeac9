"""A real server process for tests: any command that ends up in `elas-serve serve`, on a given port.

Used where the process itself is under test (the container's entrypoint) or where a test needs the
command line's behaviour (a served model name, what Prometheus scrapes). Process handling is the
load tester's `ManagedProcess` (log in a file, ready on /health, SIGTERM on exit).
"""

from __future__ import annotations

from pathlib import Path

from elas_serve.clients.process import ManagedProcess, free_port

__all__ = ["ServeProcess", "free_port"]


class ServeProcess(ManagedProcess):
    def __init__(self, cmd: list[str], port: int, log_path: Path, env: dict[str, str] | None = None,
                 timeout: float = 120.0):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        super().__init__(cmd, f"{self.url}/health", log_path, timeout, env, stop_timeout=30.0)
