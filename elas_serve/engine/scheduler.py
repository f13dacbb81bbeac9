"""Continuous-batching scheduler: which requests advance by how many tokens in the next step.

NOTE (vLLM v1's rule): there is no prefill or decode phase. Each request has
`num_computed_tokens` catching up with `num_tokens`; a step gives tokens to running requests
first (first come, first served), then admits waiting ones, within a token budget
(`max_num_batched_tokens`) and `max_num_seqs`. A prompt longer than the budget is prefilled in
chunks; prefills and decodes share a step. When the KV cache runs out, the most recently admitted
running request is preempted (its blocks freed, to be recomputed later) and goes back to the front
of the queue. The scheduler knows no tensors.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .request import Request, RequestStatus


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, num new tokens)
    preempted: list[Request] = field(default_factory=list)
    num_prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    num_prefix_hit_tokens: int = 0

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add_request(self, req: Request) -> None:
        self.waiting.append(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # 1. running requests, in admission order
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.block_manager.allocate_slots(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append((req, num_new))
                budget -= num_new
                i += 1
        # 2. waiting requests (none after a preemption: the cache is full)
        now = time.monotonic()
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            hits = self.block_manager.get_computed_blocks(req)
            num_hit_tokens = len(hits) * self.block_manager.block_size
            num_new = min(req.num_tokens - num_hit_tokens, budget)
            if not self.block_manager.allocate_slots(req, num_new, hits):
                break
            self.waiting.popleft()
            if req.status == RequestStatus.WAITING:  # first admission (not a resumed preemption)
                req.num_cached_tokens = num_hit_tokens
                req.times.first_scheduled = now
                if self.block_manager.enable_prefix_caching and not req.wants_prompt_logprobs:
                    out.num_prefix_queried_tokens += req.num_tokens
                    out.num_prefix_hit_tokens += num_hit_tokens
            req.num_computed_tokens = num_hit_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append((req, num_new))
            budget -= num_new
        return out

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update_from_output(self, out: SchedulerOutput) -> None:
        """The step ran: every scheduled request computed its scheduled tokens."""
        for req, num_new in out.scheduled:
            req.num_computed_tokens += num_new

    def finish_request(self, req: Request, status: RequestStatus) -> None:
        """Stop `req` (stopped, length or aborted) wherever it is and free its blocks."""
        assert status.is_finished
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif not req.is_finished:
            self.waiting.remove(req)
        self.block_manager.free(req)
        req.status = status
