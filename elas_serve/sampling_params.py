"""SamplingParams: how one request is sampled and when it stops (vLLM's names and semantics).

Validated in `__post_init__` with messages that name the field, so the server can turn them into
400 errors as they are. `RANGES` is the one table of numeric bounds: the checks here and the HTTP
API's schema (`server/protocol.py`) are both made from it. `temperature` below `GREEDY_EPS` means
greedy (as vLLM). `top_k` 0 or -1 disables top-k. `max_tokens == 0` is allowed (with echo/prompt
logprobs: score the prompt, generate nothing). Checks that need the model (token ids inside the
vocabulary) are the front end's (`frontend/processor.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any


class InvalidRequestError(ValueError):
    """A request that cannot be served as asked (HTTP 400); `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

MAX_LOGPROBS = 20
GREEDY_EPS = 1e-5  # NOTE: vLLM's _SAMPLING_EPS: dividing logits by a smaller temperature overflows
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's: biases are clamped to [-100, 100]
MAX_STOP_CHARS = 512  # per stop string: the held-back text is checked against each on every token


@dataclass(frozen=True, slots=True)
class Range:
    """Bounds of one numeric field; `describe` is the error text, `schema` its JSON Schema."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    integer: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or value <= self.hi

    def describe(self) -> str:
        fmt = (lambda v: str(int(v))) if self.integer else (lambda v: f"{v:g}")
        if self.hi is None:
            return f"must be at least {fmt(self.lo)}" if self.integer else f"must be a finite number >= {fmt(self.lo)}"
        if self.integer:
            return f"must be between {fmt(self.lo)} and {fmt(self.hi)}"
        return f"must be in {'(' if self.lo_open else '['}{fmt(self.lo)}, {fmt(self.hi)}]"

    def schema(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.lo is not None:
            out["exclusiveMinimum" if self.lo_open else "minimum"] = self.lo
        if self.hi is not None:
            out["maximum"] = self.hi
        return out


RANGES: dict[str, Range] = {
    "n": Range(1, integer=True),
    "temperature": Range(0),
    "top_p": Range(0, 1, lo_open=True),
    "top_k": Range(-1, integer=True),
    "min_p": Range(0, 1),
    "presence_penalty": Range(-2, 2),
    "frequency_penalty": Range(-2, 2),
    "repetition_penalty": Range(0, 2, lo_open=True),
    "max_tokens": Range(0, integer=True),
    "min_tokens": Range(0, integer=True),
    "logprobs": Range(0, MAX_LOGPROBS, integer=True),
    "prompt_logprobs": Range(0, MAX_LOGPROBS, integer=True),
    "seed": Range(-(2 ** 63), 2 ** 63 - 1, integer=True),
}


def check_range(name: str, value: Any) -> None:
    """Raise `InvalidRequestError` naming `name` unless `value` is a number within `RANGES[name]`."""
    bounds = RANGES[name]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and bounds.integer:
        ok = isinstance(value, int) or float(value).is_integer()
    if not ok or not bounds.contains(value):
        raise InvalidRequestError(f"{name} {bounds.describe()}, got {value!r}", name)


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
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text
    truncate_prompt_tokens: int | None = None  # keep only the last k prompt tokens (-1: max_model_len)
    best_of: int | None = None  # sample this many, return the n of highest cumulative log-prob

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        for name in RANGES:
            value = getattr(self, name)
            if value is not None:
                check_range(name, value)
        if self.best_of is not None and not (isinstance(self.best_of, int) and self.best_of >= self.n):
            raise InvalidRequestError(f"best_of must be an integer >= n ({self.n}), got {self.best_of!r}", "best_of")
        if self.truncate_prompt_tokens is not None and not (
                isinstance(self.truncate_prompt_tokens, int) and (self.truncate_prompt_tokens >= 1
                                                                  or self.truncate_prompt_tokens == -1)):
            raise InvalidRequestError(f"truncate_prompt_tokens must be at least 1, or -1 (the context length), got "
                                      f"{self.truncate_prompt_tokens!r}", "truncate_prompt_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got "
                                      f"{self.min_tokens}", "min_tokens")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty", "stop")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise InvalidRequestError(f"stop strings must be at most {MAX_STOP_CHARS} characters", "stop")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be token ids (integers >= 0)", "stop_token_ids")
        if self.logit_bias:
            bias = {}
            for k, v in self.logit_bias.items():
                if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                    raise InvalidRequestError(f"logit_bias keys must be token ids, got {k!r}", "logit_bias")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise InvalidRequestError(f"logit_bias values must be finite numbers, got {v!r}", "logit_bias")
                bias[k] = min(max(float(v), -LOGIT_BIAS_LIMIT), LOGIT_BIAS_LIMIT)
            self.logit_bias = bias

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    @property
    def max_token_id(self) -> int:
        """The largest token id these params name (-1 if none): checked against the vocabulary."""
        return max([*self.stop_token_ids, *(self.logit_bias or ())], default=-1)

    @property
    def num_samples(self) -> int:
        """Completions sampled for one prompt: `best_of` when given, else `n`."""
        return self.best_of or self.n

    def child(self, index: int) -> "SamplingParams":
        """The params of the `index`-th sample: n=1, distinct seed when seeded; with `best_of`,
        log-probs of the sampled tokens (the choice ranks by them)."""
        seed = None if self.seed is None else (self.seed + index) % (2 ** 63)
        logprobs = self.logprobs if self.best_of is None or self.logprobs is not None else 0
        return replace(self, n=1, best_of=None, seed=seed, logprobs=logprobs)
