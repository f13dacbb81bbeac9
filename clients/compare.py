"""`elas-loadtest compare`: the same sweep against one checkpoint served by several FFN backends.

Each server is started (`elas-serve serve --ffn-backend B` on a free loopback port, its log in the
result directory) or taken at a given URL, swept over every request rate or concurrency with the
same seed (so every backend sees the same prompts and the same arrival times), then stopped before
the next one starts: servers never share the machine while measured. The first server is the
baseline of the ratios. On a machine without CUDA the servers run the Triton backends (slowly)
under the Triton interpreter.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elas_serve.kernels.backends import FFN_BACKEND_NAMES

from .client import check_target
from .loadgen import LoadConfig, run_benchmark
from .process import ManagedProcess, free_port

BACKENDS = FFN_BACKEND_NAMES  # --ffn-backend of the servers compared
SWEEPS = ("request_rate", "max_concurrency")


@dataclass
class ServerSpec:
    label: str
    backend: str | None  # None: a server at `url`, backend unknown until its /metrics says
    url: str | None = None


def parse_servers(backends: str, urls: list[str]) -> list[ServerSpec]:
    """'dense,fused' or 'base=dense,dense' -> labelled specs (repeated names get -2, -3, ...);
    `urls` are LABEL=URL: servers already running (a LABEL also in `backends` takes its URL)."""
    given = {}
    for item in urls:
        label, sep, url = item.partition("=")
        if not sep or not label or not url:
            raise ValueError(f"--url takes LABEL=URL, got {item!r}")
        given[label] = url
    specs, seen = [], {}
    for item in (b.strip() for b in backends.split(",") if b.strip()):
        label, _, backend = item.rpartition("=")
        if backend not in BACKENDS:
            raise ValueError(f"unknown FFN backend {backend!r}: choose from {', '.join(BACKENDS)}")
        label = label or backend
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}-{seen[label]}"
        specs.append(ServerSpec(label, backend, given.pop(label, None)))
    specs += [ServerSpec(label, None, url) for label, url in given.items()]
    if not specs:
        raise ValueError("nothing to compare: give --backends and/or --url")
    return specs


@dataclass
class CompareConfig:
    servers: list[ServerSpec]
    sweep: str  # a LoadConfig field: request_rate or max_concurrency
    values: list[float]
    load: LoadConfig  # the workload; its base_url and the swept field are set per point
    model: Path | None = None  # checkpoint of the started servers (None: the bundled demo)
    device: str = "auto"
    dtype: str = "auto"
    server_args: list[str] = field(default_factory=list)
    server_timeout: float = 600.0
    allow_remote: bool = False
    result_dir: Path = Path(".")
    log_dir: Path | None = None  # server logs (default: result_dir)

    def __post_init__(self):
        if self.sweep not in SWEEPS:
            raise ValueError(f"sweep must be one of {SWEEPS}, got {self.sweep!r}")
        if not self.values or any(not v > 0 for v in self.values):
            raise ValueError(f"the sweep needs positive values, got {self.values}")
        if self.sweep == "max_concurrency" and any(not float(v).is_integer() for v in self.values):
            raise ValueError(f"concurrencies must be whole numbers, got {self.values}")
        for s in self.servers:
            if s.url is not None:
                s.url = check_target(s.url, self.allow_remote)

    def point(self, base_url: str, label: str, value: float) -> LoadConfig:
        v = int(value) if self.sweep == "max_concurrency" else value
        return dataclasses.replace(self.load, base_url=base_url, label=label, **{self.sweep: v})

    @property
    def on_cpu(self) -> bool:
        from elas_serve.utils import resolve_device  # NOTE: imports torch; what the servers pick
        return resolve_device(self.device).type == "cpu"


class ManagedServer(ManagedProcess):
    """`elas-serve serve --ffn-backend B` on a free loopback port, up once /health answers 200."""

    def __init__(self, cfg: CompareConfig, spec: ServerSpec, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "elas_serve.cli", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--ffn-backend", spec.backend, "--device", cfg.device,
               "--dtype", cfg.dtype, *(["--model", str(cfg.model)] if cfg.model else []), *cfg.server_args]
        super().__init__(cmd, f"{self.url}/health", log_path, cfg.server_timeout)


def run_compare(cfg: CompareConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every server through the whole sweep; the raw data of the comparison."""
    results: dict[str, list[dict[str, Any]]] = {}
    servers = []
    for spec in cfg.servers:
        log_path = (cfg.log_dir or cfg.result_dir) / f"server_{spec.label}.log"
        server = None if spec.url else ManagedServer(cfg, spec, log_path)
        log(f"== {spec.label}: " + (spec.url or f"starting elas-serve serve --ffn-backend {spec.backend}"))
        with server or contextlib.nullcontext():
            url = server.url if server else spec.url
            results[spec.label] = []
            for value in cfg.values:
                r = asyncio.run(run_benchmark(cfg.point(url, spec.label, value)))
                results[spec.label].append(r)
                log(f"   {cfg.sweep}={format_value(value)}: {r['completed']} ok, {r['failed']} failed, "
                    f"{r['output_throughput']:.2f} output tok/s, median TTFT {r['median_ttft_ms']:.1f} ms, "
                    f"median TPOT {r['median_tpot_ms']:.2f} ms")
        servers.append({"label": spec.label, "backend": spec.backend, "url": spec.url,
                        "started_by_compare": server is not None, "command": server.cmd[2:] if server else None,
                        "server_ffn_backend": results[spec.label][-1].get("server_ffn_backend")})
    load = {k: _jsonable(v) for k, v in dataclasses.asdict(cfg.load).items()
            if k not in ("base_url", "label", "headers", cfg.sweep)}  # NOTE: headers may hold keys
    triton_started = any(s["started_by_compare"] and s["backend"] != "dense" for s in servers)
    return {"sweep": cfg.sweep, "values": cfg.values, "baseline": cfg.servers[0].label, "servers": servers,
            "model": str(cfg.model) if cfg.model else "bundled demo", "device_arg": cfg.device,
            "interpreter": bool(triton_started and cfg.on_cpu), "server_args": cfg.server_args,
            "cpu_count": os.cpu_count(), "load": load, "results": results}


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return str(v) if isinstance(v, Path) else v


def format_value(v: float) -> str:
    """A swept value as written: 4, 0.5."""
    return str(int(v)) if float(v).is_integer() else f"{v:g}"
