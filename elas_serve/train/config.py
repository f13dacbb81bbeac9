"""`TrainConfig`: everything one training run depends on, validated up front.

Invariants: a config that passes `__post_init__` names an existing preset, a valid variant
(`ffn`, `two_by_four`, `lowrank_scope`) and positive sizes, so the trainer never meets a bad value
half-way through a run. The config is JSON-serialisable (`to_dict`) and is stored in
`training_state.json`; `--resume` checks that the model-defining fields did not change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .presets import PRESETS

LOWRANK_SCOPES = ("all", "attn", "mlp", "none")
FFNS = ("relu2", "swiglu")
SAVE_DTYPES = ("float32", "bfloat16")
PARALLEL_MODES = ("ddp", "fsdp")  # how processes share the model: replicated, or sharded (FSDP2)
# Fields that define the model: a resumed run must agree on them.
MODEL_FIELDS = ("preset", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "attn_rank", "mlp_rank", "max_position_embeddings",
                "lowrank_scope", "ffn", "two_by_four", "tie_word_embeddings")


@dataclass(slots=True)
class TrainConfig:
    # data
    data: list[str]
    out_dir: str
    eval_data: list[str] = field(default_factory=list)  # held-out files; else val_fraction
    val_fraction: float = 0.05
    tokenizer: str | None = None  # reuse this tokenizer.json; else train a byte-level BPE
    vocab_size: int | None = None  # BPE target size, or the expected size of `tokenizer`
    cache_dir: str | None = None  # token shards; default <out_dir>/tokens
    # model (None = the preset's value)
    preset: str = "tiny"
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    attn_rank: int | None = None
    mlp_rank: int | None = None
    max_position_embeddings: int | None = None
    lowrank_scope: str = "all"
    ffn: str = "relu2"
    two_by_four: bool = True
    dense_warmup_steps: int = 0
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    # optimisation
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum_steps: int = 1
    max_steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    # bookkeeping
    eval_interval: int = 200
    eval_batches: int = 16  # periodic eval: this many micro-batches; the final eval is full
    log_interval: int = 10
    save_interval: int = 0  # 0: save only at the end
    keep_last: int = 2
    resume: str | None = None  # a step_* directory, or "latest"
    device: str = "auto"
    parallel: str = "ddp"  # ddp: every process holds the whole model; fsdp: sharded over them
    save_dtype: str = "float32"
    num_threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("no training data given (pass --data FILE_OR_DIR)")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r} (choose {', '.join(PRESETS)})")
        if self.lowrank_scope not in LOWRANK_SCOPES:
            raise ValueError(f"--lowrank-scope must be one of {', '.join(LOWRANK_SCOPES)}")
        if self.ffn not in FFNS:
            raise ValueError(f"--ffn must be one of {', '.join(FFNS)}")
        if self.ffn == "swiglu" and self.dense_warmup_steps:
            raise ValueError("--dense-warmup-steps only applies to the ELAS (relu2) FFN")
        if self.ffn == "swiglu":
            self.two_by_four = False  # NOTE: 2:4 exists only on the squared-ReLU activation
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"--parallel must be one of {', '.join(PARALLEL_MODES)}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}")
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "attn_rank", "mlp_rank", "max_position_embeddings", "vocab_size",
                     "num_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("seq_len", "batch_size", "grad_accum_steps", "max_steps", "log_interval",
                     "eval_batches", "keep_last"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "dense_warmup_steps", "eval_interval", "save_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0:
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1 and weight_decay >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1) or self.grad_clip < 0:
            raise ValueError("need betas in [0, 1) and grad_clip >= 0")
        if self.init_std <= 0:
            raise ValueError("init_std must be positive")

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step in one process (times world size for the whole run)."""
        return self.batch_size * self.grad_accum_steps * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
