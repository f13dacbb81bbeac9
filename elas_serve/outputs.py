"""What a generation request produces, as its callers see it (offline `LLM` and the HTTP server).

A `RequestOutput` is one prompt's result: `outputs` holds its `n` completions (`CompletionOutput`,
by `index`). In a stream each `RequestOutput` carries deltas (the new text and tokens of the
completions that moved); `CompletionOutput.add` accumulates deltas into a whole completion.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprob:
    """Log-prob of one token, with the `top` most likely alternatives (id, logprob)."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per token when log-probs were asked for
    finish_reason: str | None = None  # stop | length | abort
    stop_reason: str | int | None = None  # the stop string or stop token id that matched

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, delta: "CompletionOutput") -> None:
        """Append a stream delta of the same completion."""
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | list[int] | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first entry None: nothing scores it
    finished: bool = False  # every completion has finished
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
