"""What the engine reports to its stat loggers (Prometheus lives in the server, not here).

`StepStats` describes one step: gauges after it, counter increments during it, and the latency
samples it produced. Finished requests are reported separately (`StatLogger.on_finished`), at
the moment they finish, aborts included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .request import Request


@dataclass(slots=True)
class StepStats:
    start: float
    t_schedule: float = 0.0
    t_forward: float = 0.0
    end: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_batched_tokens: int = 0
    num_prompt_tokens: int = 0  # prompts that finished prefilling in this step
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    num_prefix_queried_tokens: int = 0
    num_prefix_hit_tokens: int = 0
    ttfts: list[float] = field(default_factory=list)
    itls: list[float] = field(default_factory=list)
    ffn_activation_density: float | None = None  # sampled: non-zeros after relu², before 2:4

    @property
    def phase_seconds(self) -> dict[str, float]:
        return {"schedule": self.t_schedule - self.start, "forward": self.t_forward - self.t_schedule,
                "output": self.end - self.t_forward}


class StatLogger(Protocol):
    def on_step(self, stats: StepStats) -> None: ...

    def on_finished(self, req: Request) -> None: ...
