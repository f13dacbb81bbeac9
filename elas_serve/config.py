"""EngineConfig: what the engine is asked to run and with which limits (CLI flags map 1:1).

Invariants checked in `__post_init__`: positive sizes; `max_num_batched_tokens >= 1`; at most one
of `num_kv_blocks` / `kv_cache_memory`. Values that depend on the loaded model (`max_model_len`
default, KV cache size) are resolved by the engine once the model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from elas_serve.utils import DEMO_CHECKPOINT

FFN_BACKEND_CHOICES = ("auto", "dense", "sparse24", "fused")
DEFAULT_MAX_CHOICES = 1024  # prompts x n in one HTTP request (--max-choices-per-request)


@dataclass(slots=True)
class EngineConfig:
    model: str | Path = DEMO_CHECKPOINT
    tokenizer: str | Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    ffn_backend: str = "auto"
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None  # bytes
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    seed: int = 0  # seeds the sampler of requests without their own seed
    cpu_threads: int | None = None  # torch intra-op threads on CPU (default: all cores but one)

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
        if self.ffn_backend not in FFN_BACKEND_CHOICES:
            raise ValueError(f"ffn_backend must be one of {', '.join(FFN_BACKEND_CHOICES)}, "
                             f"got {self.ffn_backend!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Build from keyword arguments, ignoring those that are not config fields."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in names and v is not None})
