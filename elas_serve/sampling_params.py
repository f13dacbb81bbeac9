"""SamplingParams: how one request is sampled and when it stops (vLLM's names and semantics).

Validated in `__post_init__` with messages that name the field, so the server can turn them into
400 errors as they are. `temperature == 0` means greedy. `top_k` 0 or -1 disables top-k.
`max_tokens == 0` is allowed (with echo/prompt logprobs: score the prompt, generate nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from elas_serve.errors import InvalidRequestError

MAX_LOGPROBS = 20


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k log-probs per sampled token (the sampled one always)
    prompt_logprobs: int | None = None  # same for prompt tokens (echo); first token gets None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])

        def check(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise InvalidRequestError(f"{param} {message}", param)

        check(self.n >= 1, "n", f"must be at least 1, got {self.n}")
        check(math.isfinite(self.temperature) and self.temperature >= 0, "temperature",
              f"must be a finite number >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.top_k == -1 or self.top_k >= 0, "top_k", f"must be -1 (disabled) or >= 0, got {self.top_k}")
        check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(-2 <= value <= 2, name, f"must be in [-2, 2], got {value}")
        check(0 < self.repetition_penalty <= 2 and math.isfinite(self.repetition_penalty),
              "repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}")
        check(self.max_tokens is None or self.max_tokens >= 0, "max_tokens",
              f"must be at least 0, got {self.max_tokens}")
        check(self.min_tokens >= 0, "min_tokens", f"must be at least 0, got {self.min_tokens}")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
              f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "strings must be non-empty")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or 0 <= value <= MAX_LOGPROBS, name,
                  f"must be between 0 and {MAX_LOGPROBS}, got {value}")
        check(self.seed is None or -(2 ** 63) <= self.seed < 2 ** 63, "seed", "must fit in 64 bits")
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            check(all(-100 <= v <= 100 for v in self.logit_bias.values()), "logit_bias",
                  "values must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    def child(self, index: int) -> "SamplingParams":
        """The params of the `index`-th of `n` samples: n=1, distinct seed when seeded."""
        from dataclasses import replace
        seed = None if self.seed is None else (self.seed + index) % (2 ** 63)
        return replace(self, n=1, seed=seed)
