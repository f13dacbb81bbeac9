"""What crosses between the front end and the engine core (the core may run in its own process).

Front end -> core: `EngineCoreRequest` (tokenized, validated, `n == 1`, `max_tokens` resolved),
aborts. Core -> front end: `EngineCoreOutputs` after every step (or abort): per-request token
deltas, finish reasons, and a `SchedulerStats` snapshot that is the only view of the core's state
the front end (and so the metrics) ever reads. Everything here is plain data and pickles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from elas_serve.outputs import TokenLogprob
from elas_serve.sampling_params import SamplingParams


@dataclass(slots=True)
class EngineCoreRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # n == 1
    max_tokens: int  # params.max_tokens clamped to what the context leaves
    eos_token_ids: list[int]  # empty with ignore_eos
    arrival_time: float  # time.monotonic() of the front end (the same clock on one machine)


@dataclass(slots=True)
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, when the prompt is done
    finish_reason: str | None = None  # stop | length | abort | error (None: still running)
    stop_reason: int | None = None  # the stop token id that matched
    error: str | None = None  # with finish_reason "error"
    num_cached_tokens: int = 0
    first_scheduled: float | None = None  # on the last output: when the core first scheduled it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class SchedulerStats:
    """The core after one step: gauges, and counters as increments since the last snapshot."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_prompt_tokens: int = 0  # prompts that finished prefilling (each of n counts)
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    num_prefix_queried_tokens: int = 0
    num_prefix_hit_tokens: int = 0
    step_seconds: dict[str, float] | None = None  # schedule / forward / output of the step
    ffn_activation_density: float | None = None  # sampled: non-zeros after relu², before 2:4


@dataclass(slots=True)
class EngineCoreOutputs:
    outputs: list[EngineCoreOutput]
    stats: SchedulerStats
    dead: str | None = None  # the core stopped serving (why); nothing follows


@dataclass(slots=True)
class ModelInfo:
    """What the front end must know of the model the core loaded."""

    model: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]  # from config.json (the tokenizer may add its own)
    dtype: str
    device: str
    ffn_backend: str
    num_kv_blocks: int
    block_size: int
