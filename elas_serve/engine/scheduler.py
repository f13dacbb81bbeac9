"""Continuous-batching scheduler: which requests advance by how many tokens in the next step, and
what a step's results do to them.

NOTE (vLLM v1's rule): there is no prefill or decode phase. Each request has
`num_computed_tokens` catching up with `num_tokens`; a step gives tokens to running requests
first (first come, first served), then admits waiting ones, within a token budget
(`max_num_batched_tokens`) and `max_num_seqs`. A prompt longer than the budget is prefilled in
chunks; prefills and decodes share a step. When the KV cache runs out, the most recently admitted
running request is preempted (its blocks freed, to be recomputed later) and goes back to the front
of the queue.

The scheduler owns every request state transition: `schedule` admits and preempts,
`update_from_output` appends the sampled tokens and applies the token stops (EOS, stop token ids
once `min_tokens` are out, `max_tokens`), `finish_requests` aborts; finished requests' blocks are
freed at once. `SchedulerOutput` carries what the model runner needs (each request with its block
table), so the runner never sees the block manager. The scheduler knows no tensors.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from elas_serve.outputs import TokenLogprob

from .block_manager import BlockManager
from .messages import EngineCoreOutput, SchedulerStats
from .request import Request, RequestStatus

log = logging.getLogger("elas_serve.engine")


class ScheduledRequest(NamedTuple):
    request: Request  # read-only for the runner
    num_new_tokens: int


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # request id -> its KV blocks (the block manager's own list: read, never changed)
    block_tables: dict[str, list[int]] = field(default_factory=dict)
    preempted: list[Request] = field(default_factory=list)
    finished_req_ids: set[str] = field(default_factory=set)  # since the last step: runner state to drop
    num_prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    num_prefix_hit_tokens: int = 0

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    # request id -> log-probs of prompt tokens [first, first + len) computed in this step
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprob]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # request id -> why (non-finite logits)
    ffn_activation_density: float | None = None  # sampled on some eager steps


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0  # since start
        self.stats = SchedulerStats()  # increments since the last `make_stats`
        self._finished_ids: set[str] = set()

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_ids)
        self._finished_ids = set()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        # 1. running requests, in admission order
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not bm.allocate_slots(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, num_new))
                budget -= num_new
                i += 1
        # 2. waiting requests (none after a preemption: the cache is full)
        now = time.monotonic()
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            hits = bm.get_computed_blocks(req)
            num_hit_tokens = len(hits) * bm.block_size
            num_new = min(req.num_tokens - num_hit_tokens, budget)
            if not bm.allocate_slots(req, num_new, hits):
                break
            self.waiting.popleft()
            if req.status == RequestStatus.WAITING:  # first admission (not a resumed preemption)
                req.num_cached_tokens = num_hit_tokens
                req.first_scheduled = now
                if bm.enable_prefix_caching and not req.wants_prompt_logprobs:
                    out.num_prefix_queried_tokens += req.num_tokens
                    out.num_prefix_hit_tokens += num_hit_tokens
            req.num_computed_tokens = num_hit_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new
        out.block_tables = {req.request_id: bm.block_table(req.request_id) for req, _ in out.scheduled}
        self.stats.num_preemptions += len(out.preempted)
        self.stats.num_prefix_queried_tokens += out.num_prefix_queried_tokens
        self.stats.num_prefix_hit_tokens += out.num_prefix_hit_tokens
        return out

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update_from_output(self, sched: SchedulerOutput, result: RunnerOutput) -> list[EngineCoreOutput]:
        """The step ran: advance every scheduled request, append what was sampled, stop and free
        what finished; one output per request that has something to say."""
        outputs = []
        for req, num_new in sched.scheduled:
            if req.request_id in result.failed:
                outputs.append(self.finish_request(req, RequestStatus.FINISHED_ERROR, result.failed[req.request_id]))
                continue
            try:
                out = self._update(req, num_new, result)
            except Exception as e:  # noqa: BLE001 (this request fails; the others go on)
                log.exception("accounting the step of request %s failed", req.request_id)
                if not req.is_finished:
                    outputs.append(self.finish_request(req, RequestStatus.FINISHED_ERROR,
                                                       f"the engine failed on this request: {type(e).__name__}: {e}"))
                continue
            if out is not None:
                outputs.append(out)
        return outputs

    def _update(self, req: Request, num_new: int, result: RunnerOutput) -> EngineCoreOutput | None:
        rid = req.request_id
        out = EngineCoreOutput(rid, num_cached_tokens=req.num_cached_tokens)
        req.num_computed_tokens += num_new
        if rid in result.prompt_logprobs:
            first, items = result.prompt_logprobs[rid]
            if not req.prompt_logprobs:
                req.prompt_logprobs.append(None)  # nothing scores the first prompt token
            assert first == len(req.prompt_logprobs)
            req.prompt_logprobs.extend(items)
        # NOTE: once: the step that completes the prompt samples a token (or finishes it)
        prompt_done = req.num_output_tokens == 0 and req.num_computed_tokens >= req.num_prompt_tokens
        if prompt_done:
            self.stats.num_prompt_tokens += req.num_prompt_tokens
            if req.wants_prompt_logprobs:
                out.prompt_logprobs = list(req.prompt_logprobs)
        status = None
        token = result.sampled.get(rid)
        if token is not None:
            req.append_token(token)
            self.stats.num_generation_tokens += 1
            out.new_token_ids = [token]
            if rid in result.logprobs:
                out.new_logprobs = [result.logprobs[rid]]
            status = self._check_stop(req, token)
        elif req.num_computed_tokens == req.num_tokens and req.num_output_tokens >= req.max_tokens:
            status = RequestStatus.FINISHED_LENGTH  # max_tokens == 0: only the prompt was wanted
        if status is not None:
            self._finish(req, status)
            out.finish_reason, out.stop_reason = status.finish_reason, req.stop_reason
            out.first_scheduled = req.first_scheduled
        if token is not None or prompt_done or status is not None:
            return out
        return None

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        """Token stops (vLLM's order): EOS and stop token ids once min_tokens are out, then
        max_tokens. Stop strings are the front end's (it sees the text)."""
        p = req.params
        if req.num_output_tokens >= p.min_tokens:
            if token in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in p.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish_request(self, req: Request, status: RequestStatus, error: str | None = None) -> EngineCoreOutput:
        """Stop `req` from outside (aborted, or failed with `error`) wherever it is; its last output."""
        self._finish(req, status)
        return EngineCoreOutput(req.request_id, finish_reason=status.finish_reason, error=error,
                                num_cached_tokens=req.num_cached_tokens, first_scheduled=req.first_scheduled)

    def finish_requests(self, request_ids: list[str], status: RequestStatus,
                        error: str | None = None) -> list[EngineCoreOutput]:
        return [self.finish_request(self.requests[rid], status, error) for rid in request_ids if rid in self.requests]

    def _finish(self, req: Request, status: RequestStatus) -> None:
        assert status.is_finished
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif not req.is_finished:
            self.waiting.remove(req)
        self.block_manager.free(req)
        req.status = status
        self.requests.pop(req.request_id, None)
        self._finished_ids.add(req.request_id)

    def make_stats(self) -> SchedulerStats:
        """Gauges now, and the counters' increments since the last call."""
        stats, self.stats = self.stats, SchedulerStats()
        stats.num_running, stats.num_waiting = len(self.running), len(self.waiting)
        stats.kv_cache_usage = self.block_manager.usage
        return stats
