"""A local service in a subprocess, for as long as a `with` block: started, waited for, stopped.

`ManagedProcess` starts a command with its output in a log file, is ready once GET `ready_url`
answers 200, and on exit sends SIGTERM (then SIGKILL after `stop_timeout`). A process that exits
before it is ready, or is not ready in time, raises `LoadTestError` with the last line of its log.
Used by `elas-loadtest compare` (servers), the tests and the deploy scripts (servers, Prometheus).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from .client import LoadTestError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ManagedProcess:
    def __init__(self, cmd: list[str], ready_url: str, log_path: Path, timeout: float = 600.0,
                 env: dict[str, str] | None = None, name: str = "the server", stop_timeout: float = 60.0):
        self.cmd, self.ready_url, self.log_path, self.timeout = cmd, ready_url, log_path, timeout
        self.env = {**os.environ, **env} if env else None
        self.name, self.stop_timeout = name, stop_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LoadTestError(f"{self.name} exited with code {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.ready_url, timeout=2, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.__exit__()
        raise LoadTestError(f"{self.name} did not answer {self.ready_url} within {self.timeout:.0f} s "
                            f"(log: {self.log_path})")

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self) -> str:
        lines = self.log().strip().splitlines()
        return lines[-1] if lines else f"(empty log {self.log_path})"
