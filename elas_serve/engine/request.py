"""A request inside the engine core, and its statuses.

A request only has `num_computed_tokens` catching up with its tokens (prompt + generated): there
are no prefill/decode phases. Chunked prefill is "schedule fewer tokens"; preemption resets
`num_computed_tokens` to 0 and the request recomputes its tokens later (prefix caching makes that
cheap). Statuses are ordered so that `is_finished` is `status > PREEMPTED` (as in vLLM v1).
Only the scheduler changes a request; the model runner reads it.
"""

from __future__ import annotations

import enum

from elas_serve.outputs import TokenLogprob
from elas_serve.sampling_params import SamplingParams

from .messages import EngineCoreRequest


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6  # its step failed, or its logits were not finite

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return {3: "stop", 4: "length", 5: "abort", 6: "error"}.get(int(self))


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: list[int], max_tokens: int | None = None, arrival_time: float = 0.0):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = [] if params.ignore_eos else list(eos_token_ids)
        self.max_tokens = max_tokens if max_tokens is not None else (
            params.max_tokens if params.max_tokens is not None else 1 << 30)
        self.arrival_time = arrival_time
        self.all_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache (first schedule)
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | None = None
        self.first_scheduled: float | None = None
        self.prompt_logprobs: list[TokenLogprob | None] = []

    @classmethod
    def from_core_request(cls, r: EngineCoreRequest) -> "Request":
        return cls(r.request_id, r.prompt_token_ids, r.params, r.eos_token_ids, r.max_tokens, r.arrival_time)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, "
                f"computed={self.num_computed_tokens}/{self.num_tokens})")
