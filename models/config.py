"""ELAS model configuration, read from a checkpoint's `config.json`.

Owns the mapping from the authors' LLaMA-style config fields (HF `LlamaConfig` plus the ELAS
training fields written by their `run_c4.py`) to the shapes the runtime builds. Invariants:
- `intermediate_size` is the SwiGLU width as written by the authors; the ELAS FFN width is
  `int(1.5 * intermediate_size)` when `squ_relu == "relu2"` (`ffn_width`).
- `squ_relu` absent means a plain LLaMA (SwiGLU) checkpoint.
- Only the "naive" 2:4 selection (strict top-2 of 4 by magnitude) is implemented; any other
  `activation_sparse_method` on a 2:4 checkpoint is refused rather than silently approximated.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint that cannot be served as is; the message names the file and tensor."""


SUPPORTED_SPARSE_METHODS = ("naive",)
FFN_KINDS = {"relu2": "relu2", "silu": "swiglu", None: "swiglu"}


@dataclass(slots=True)
class ElasConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    # ELAS training fields (authors' names). Inference ignores the others they write.
    squ_relu: str | None = None
    activation_2by4: bool = False
    activation_sparse_method: str = "naive"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("hidden_size", "intermediate_size", "num_attention_heads",
                     "num_hidden_layers", "vocab_size", "num_key_value_heads",
                     "max_position_embeddings", *(("head_dim",) if self.head_dim is not None else ())):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.squ_relu not in FFN_KINDS:
            raise ValueError(f"squ_relu={self.squ_relu!r} is not supported "
                             f"(expected 'relu2' for the ELAS FFN or 'silu' for SwiGLU)")
        if self.activation_2by4 and self.squ_relu != "relu2":
            raise ValueError("activation_2by4 is set but squ_relu is not 'relu2': the 2:4 "
                             "activation sparsity only exists on the squared-ReLU FFN")
        if self.activation_2by4 and self.activation_sparse_method not in SUPPORTED_SPARSE_METHODS:
            raise ValueError(f"activation_sparse_method={self.activation_sparse_method!r} is not "
                             f"supported (implemented: {', '.join(SUPPORTED_SPARSE_METHODS)})")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("rms_norm_eps and rope_theta must be positive")

    @property
    def ffn_kind(self) -> str:
        """'relu2' (ELAS: down(mask24(relu(up(x))**2))) or 'swiglu' (down(silu(gate(x)) * up(x)))."""
        return FFN_KINDS[self.squ_relu]

    @property
    def ffn_width(self) -> int:
        if self.ffn_kind == "relu2":
            return int(1.5 * self.intermediate_size)
        return self.intermediate_size

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ElasConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        # NOTE: the authors' configs carry `max_sequence_length` (their training length) next to
        # HF's `max_position_embeddings`; the HF field wins when both are present.
        if "max_position_embeddings" not in raw and "max_sequence_length" in raw:
            kwargs["max_position_embeddings"] = raw["max_sequence_length"]
        for key in ("rope_theta", "rms_norm_eps"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        if "activation_2by4" in kwargs:
            kwargs["activation_2by4"] = bool(kwargs["activation_2by4"])
        if kwargs.get("activation_sparse_method") is None:
            kwargs.pop("activation_sparse_method", None)
        if kwargs.get("tie_word_embeddings") is None:
            kwargs.pop("tie_word_embeddings", None)
        missing = [f.name for f in fields(cls) if kwargs.get(f.name) is None and f.default is MISSING]
        if missing:
            raise ValueError(f"missing required field(s): {', '.join(missing)}")
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> "ElasConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file (a checkpoint needs config.json)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read config: {e}") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
