"""Scheduler: token budget, max_num_seqs, chunked prefill, mixed steps, FCFS, preemption.

Pure Python (no model): a step is simulated by `update_from_output` with one token sampled for
each request that caught up. Run: python -m pytest tests/test_scheduler.py -v
"""

from __future__ import annotations

from elas_serve.engine.block_manager import BlockManager
from elas_serve.engine.request import Request, RequestStatus
from elas_serve.engine.scheduler import RunnerOutput, Scheduler
from elas_serve.sampling_params import SamplingParams


def make(rid: str, n: int, start: int = 0) -> Request:
    return Request(rid, list(range(start, start + n)), SamplingParams(), eos_token_ids=[])


def run_step(s: Scheduler) -> list[tuple[str, int]]:
    """One step as the model runner would serve it: token 7 for every request it brings level."""
    out = s.schedule()
    sampled = {r.request_id: 7 for r, n in out.scheduled if r.num_computed_tokens + n == r.num_tokens}
    s.update_from_output(out, RunnerOutput(sampled=sampled))
    return [(r.request_id, n) for r, n in out.scheduled]


def test_token_budget_chunks_long_prompts_and_mixes_decodes():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    s.add_request(make("a", 3))
    s.add_request(make("b", 17, start=100))
    assert run_step(s) == [("a", 3), ("b", 7)]  # b's prefill chunked by the budget
    assert run_step(s) == [("a", 1), ("b", 9)]  # a decodes while b keeps prefilling
    assert run_step(s) == [("a", 1), ("b", 1)]  # b's last prompt token, then decodes
    assert s.running[1].num_output_tokens == 1


def test_max_num_seqs_limits_running():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        s.add_request(make(f"r{i}", 2, start=10 * i))
    assert run_step(s) == [("r0", 2), ("r1", 2)]
    assert [r.request_id for r in s.waiting] == ["r2"]
    s.finish_request(s.running[0], RequestStatus.FINISHED_STOPPED)
    assert run_step(s) == [("r1", 1), ("r2", 2)]


def test_fcfs_waiting_head_blocks_later_requests():
    """A request that does not fit is not overtaken by a smaller one behind it."""
    s = Scheduler(BlockManager(5, 4), max_num_seqs=8, max_num_batched_tokens=100)  # 4 usable blocks
    s.add_request(make("a", 8))
    s.add_request(make("big", 12, start=100))
    s.add_request(make("small", 2, start=200))
    assert run_step(s) == [("a", 8)]
    assert [r.request_id for r in s.waiting] == ["big", "small"]


def test_preemption_by_recompute_when_blocks_run_out():
    s = Scheduler(BlockManager(5, 4), max_num_seqs=8, max_num_batched_tokens=100)  # 4 usable blocks
    s.add_request(make("a", 4))
    s.add_request(make("b", 4, start=100))
    assert run_step(s) == [("a", 4), ("b", 4)]  # 2 blocks used, then 1 token each
    assert run_step(s) == [("a", 1), ("b", 1)]  # 4 blocks used
    for _ in range(3):
        run_step(s)  # 4 + 1 + 4 tokens: both fill their second block
    # a needs a third block: none free -> the last admitted (b) is preempted, a goes on
    out = s.schedule()
    assert [r.request_id for r in out.preempted] == ["b"]
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 1)]
    b = s.waiting[0]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.block_manager.block_table("b") == [] and s.num_preemptions == 1
    s.update_from_output(out, RunnerOutput())
    # once a finishes, b is readmitted and recomputes its 9 tokens (prompt + generated) in one
    # go, minus its first block, which is still in the prefix cache
    s.finish_request(s.running[0], RequestStatus.FINISHED_LENGTH)
    assert b.num_tokens == 9
    assert run_step(s) == [("b", 9 - 4)]
    assert b.status == RequestStatus.RUNNING and b.num_output_tokens == 6


def test_running_request_preempts_itself_when_alone():
    s = Scheduler(BlockManager(3, 2), max_num_seqs=4, max_num_batched_tokens=100)  # 2 usable blocks
    s.add_request(make("a", 4))
    assert run_step(s) == [("a", 4)]
    out = s.schedule()  # needs a 3rd block for token 5
    assert [r.request_id for r in out.preempted] == ["a"] and out.scheduled == []
    assert list(s.waiting)[0].request_id == "a"


def test_prefix_hits_are_counted_and_skipped():
    s = Scheduler(BlockManager(32, 4), max_num_seqs=8, max_num_batched_tokens=100)
    s.add_request(make("a", 10))
    run_step(s)
    s.add_request(make("b", 10))  # same 10 tokens: 2 full blocks hit, 2 tokens computed
    out = s.schedule()
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 1), ("b", 2)]
    assert out.num_prefix_queried_tokens == 10 and out.num_prefix_hit_tokens == 8
    assert s.running[1].num_cached_tokens == 8


def test_finish_request_frees_blocks_anywhere():
    bm = BlockManager(16, 4)
    s = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=100)
    s.add_request(make("a", 5))
    s.add_request(make("b", 5, start=50))
    run_step(s)
    a, b = s.running[0], s.waiting[0]
    s.finish_request(b, RequestStatus.FINISHED_ABORTED)  # aborted while waiting
    s.finish_request(a, RequestStatus.FINISHED_ABORTED)  # aborted while running
    assert s.num_unfinished == 0 and bm.num_free_blocks == 15
