"""EngineConfig (what the engine core runs, with which limits) and ServerConfig (the HTTP server's
own options). Each field's metadata carries its command-line help: `elas-serve serve` builds its
flags from these fields (`cli.py`), so every default is written here and only here.

Invariants checked in `__post_init__`: positive sizes; at most one of `num_kv_blocks` /
`kv_cache_memory`; a known FFN backend; a queue limit of at least 1 when set; a non-empty API key
when set. Values that depend on the loaded model (`max_model_len` default, KV cache size) are
resolved by the engine core once the model is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from elas_serve.kernels.backends import FFN_BACKEND_NAMES
from elas_serve.utils import DEMO_CHECKPOINT


def parse_list(text: str) -> list[str]:
    """'["a", "b"]' (JSON, as vLLM's flags take it) or 'a,b' -> ['a', 'b']."""
    text = text.strip()
    if text.startswith("["):
        value = json.loads(text)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a JSON list of strings, got {text!r}")
        return value
    return [v.strip() for v in text.split(",") if v.strip()]


def env_default(env: str, default: Any) -> Any:
    """`$env` when set (read as a boolean when `default` is one), else `default`."""
    raw = os.environ.get(env)
    if raw is None:
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on") if isinstance(default, bool) else raw


def opt(default: Any, help: str, env: str | None = None, **argparse_kwargs: Any) -> Any:
    """A config field whose metadata says how its command-line flag reads; with `env`, the
    environment variable that overrides the default (for the CLI and the Python API alike)."""
    metadata = {"help": help, **argparse_kwargs}
    if env is None:
        return field(default=default, metadata=metadata)
    return field(default_factory=lambda: env_default(env, default), metadata={**metadata, "env": env, "declared": default})


@dataclass(slots=True)
class EngineConfig:
    model: str | Path = opt(DEMO_CHECKPOINT, "checkpoint directory (default: the bundled demo checkpoint)",
                            type=Path)
    tokenizer: str | Path | None = opt(None, "tokenizer.json or a directory with one (default: the checkpoint's)",
                                       type=Path)
    device: str = opt("auto", "auto | cpu | cuda[:N] (auto: CUDA when present)")
    dtype: str = opt("auto", "weights and activations (auto: float32 on CPU, bfloat16 on CUDA)",
                     choices=("auto", "float32", "bfloat16", "float16"))
    ffn_backend: str = opt("auto", "how the ELAS FFN runs (docs/kernels.md)", choices=FFN_BACKEND_NAMES)
    max_model_len: int | None = opt(None, "context length (default: the model's max_position_embeddings)")
    max_num_seqs: int = opt(128, "sequences in one batch")
    max_num_batched_tokens: int = opt(2048, "tokens in one engine step (longer prompts are prefilled in chunks)")
    block_size: int = opt(16, "tokens per KV-cache block")
    num_kv_blocks: int | None = opt(None, "KV-cache blocks (default: sized from memory)")
    kv_cache_memory: int | None = opt(None, "KV-cache bytes, e.g. 2G (default: what the device leaves)",
                                      byte_size=True)
    gpu_memory_utilization: float = opt(0.9, "share of GPU memory the server may use (KV cache sizing)")
    enable_prefix_caching: bool = opt(True, "reuse the KV blocks of shared prompt prefixes",
                                      flag="--no-prefix-caching")
    enforce_eager: bool = opt(False, "no torch.compile and no CUDA graphs (docs/engine.md; default: "
                                     "$ELAS_SERVE_ENFORCE_EAGER, else off)", env="ELAS_SERVE_ENFORCE_EAGER")
    seed: int = opt(0, "seeds the sampling of requests without their own seed")
    cpu_threads: int | None = opt(None, "torch threads on CPU (default: all cores but one)")

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_model_len", "num_kv_blocks", "kv_cache_memory", "cpu_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.num_kv_blocks is not None and self.kv_cache_memory is not None:
            raise ValueError("give at most one of num_kv_blocks and kv_cache_memory")
        if self.ffn_backend not in FFN_BACKEND_NAMES:
            raise ValueError(f"ffn_backend must be one of {', '.join(FFN_BACKEND_NAMES)}, "
                             f"got {self.ffn_backend!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Build from keyword arguments, ignoring those that are not config fields."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in names and v is not None})


@dataclass(slots=True)
class ServerConfig:
    host: str = opt("127.0.0.1", "address to bind (beyond loopback, set an API key)")
    port: int = opt(8000, "port to bind")
    served_model_name: str | None = opt(None, "model name clients send (default: the --model argument, or "
                                              "elas-demo)")
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' (default: $ELAS_SERVE_API_KEY)",
                              env="ELAS_SERVE_API_KEY")
    max_queued_requests: int | None = opt(None, "refuse (503) requests beyond this many waiting; at least 1 "
                                                "(default: no limit)")
    max_choices_per_request: int = opt(1024, "refuse (400) requests of more than this many prompts x n")
    max_request_bytes: int = opt(16 << 20, "refuse (413) request bodies larger than this, e.g. 16M",
                                 byte_size=True)
    shutdown_timeout: float = opt(30.0, "seconds in-flight requests get to finish after SIGTERM")
    chat_template: str | None = opt(None, "Jinja chat template: a file, or the template itself (default: the "
                                          "tokenizer's, else a plain 'role: content' one)")
    allowed_origins: list[str] | None = opt(None, "CORS: origins allowed to call the API from a browser, as a "
                                                  "JSON list or comma-separated (default: none)",
                                            type=lambda text: parse_list(text))
    root_path: str = opt("", "path prefix when served behind a proxy that strips it (FastAPI's root_path)")
    log_level: str = opt("info", "elas-serve's log level", choices=("debug", "info", "warning", "error"))
    uvicorn_log_level: str = opt("info", "uvicorn's log level (info: one access line per request)",
                                 choices=("debug", "info", "warning", "error", "critical", "trace"))
    disable_log_requests: bool = opt(False, "no log line per received request")
    disable_log_stats: bool = opt(False, "no periodic stats line")
    log_stats_interval: float = opt(10.0, "seconds between stats lines")

    def __post_init__(self) -> None:
        if self.max_queued_requests is not None and self.max_queued_requests < 1:
            raise ValueError("--max-queued-requests must be at least 1 (leave it out for no limit)")
        if self.max_choices_per_request < 1:
            raise ValueError("--max-choices-per-request must be at least 1")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key (or ELAS_SERVE_API_KEY) is empty: give a key, or unset it to serve "
                             "without one")
        if self.max_request_bytes < 1 or self.shutdown_timeout < 0:
            raise ValueError("--max-request-bytes must be positive and --shutdown-timeout not negative")
        if self.log_stats_interval <= 0:
            raise ValueError("--log-stats-interval must be positive")
        if self.root_path and not self.root_path.startswith("/"):
            raise ValueError(f"--root-path must start with '/', got {self.root_path!r}")

    def load_chat_template(self) -> str | None:
        """The template text: `chat_template` read from its file, or as given when it is not a path."""
        if self.chat_template is None:
            return None
        path = Path(self.chat_template)
        try:
            return path.read_text() if path.is_file() else self.chat_template
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--chat-template {self.chat_template}: cannot read ({e})") from None

    def model_name(self, engine: EngineConfig) -> str:
        if self.served_model_name:
            return self.served_model_name
        return "elas-demo" if Path(engine.model) == DEMO_CHECKPOINT else str(engine.model)


@dataclass(slots=True)
class ReplicaConfig:
    """Serving N engine replicas on Ray Serve (`elas-serve[ray]`); off unless a count is given."""

    replicas: int | None = opt(None, "serve this many engine replicas on Ray Serve, behind one ingress")
    min_replicas: int | None = opt(None, "autoscale: at least this many replicas (with --max-replicas)")
    max_replicas: int | None = opt(None, "autoscale: at most this many replicas")
    target_ongoing_requests: float = opt(16.0, "autoscale: requests in flight per replica to aim at")
    ray_address: str | None = opt(None, "join a Ray cluster ('auto': the one `ray start` made here; default: "
                                        "start a local one)")
    replica_cpus: float = opt(1.0, "CPUs Ray reserves per replica")
    replica_gpus: float | None = opt(None, "GPUs per replica (default: 1 when CUDA is present, else 0)")
    routing: str = opt("prefix", "replica choice: prefix = by load with prefix affinity, round_robin",
                       choices=("prefix", "round_robin"))

    def __post_init__(self) -> None:
        for name in ("replicas", "min_replicas", "max_replicas"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both --min-replicas and --max-replicas (or neither)")
        if self.replicas is not None and self.min_replicas is not None:
            raise ValueError("give --replicas or --min-replicas/--max-replicas, not both")
        if self.min_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError("--min-replicas must not exceed --max-replicas")
        if self.target_ongoing_requests <= 0 or self.replica_cpus < 0:
            raise ValueError("--target-ongoing-requests must be positive and --replica-cpus not negative")

    @property
    def enabled(self) -> bool:
        return self.replicas is not None or self.min_replicas is not None
