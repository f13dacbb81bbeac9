"""Paged KV bookkeeping with exact block ids (vLLM-style CPU tests; no tensors).

Run: python -m pytest tests/test_block_manager.py -v
"""

from __future__ import annotations

import pytest

from elas_serve.engine.block_manager import BlockManager
from elas_serve.engine.request import Request
from elas_serve.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int], **params) -> Request:
    return Request(rid, tokens, SamplingParams(**params), eos_token_ids=[])


def test_allocate_free_and_lru_order():
    bm = BlockManager(num_blocks=9, block_size=4)  # usable blocks 1..8
    a = make_request("a", list(range(10)))  # 3 blocks
    assert bm.allocate_slots(a, 10)
    assert bm.block_table("a") == [1, 2, 3]
    b = make_request("b", list(range(100, 105)))
    assert bm.allocate_slots(b, 5)
    assert bm.block_table("b") == [4, 5]
    assert bm.num_free_blocks == 3 and bm.usage == pytest.approx(5 / 8)
    a.num_computed_tokens = 10  # decode steps: 2 more tokens fit in block 3, the 3rd needs a new one
    a.append_token(10), a.append_token(11)
    assert bm.allocate_slots(a, 2) and bm.block_table("a") == [1, 2, 3]
    a.num_computed_tokens = 12
    a.append_token(12)
    assert bm.allocate_slots(a, 1) and bm.block_table("a") == [1, 2, 3, 6]
    bm.free(a)
    # partial block 6 (no hash) goes to the head; full blocks follow in reverse order
    assert list(bm.free_queue) == [6, 7, 8, 3, 2, 1]
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0


def test_all_or_nothing_when_out_of_blocks():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_request("a", list(range(8)))
    assert bm.allocate_slots(a, 8)
    b = make_request("b", list(range(50, 59)))
    assert not bm.allocate_slots(b, 9)  # needs 3, 1 free
    assert bm.block_table("b") == [] and bm.num_free_blocks == 1


def test_prefix_cache_hits_share_full_blocks():
    bm = BlockManager(num_blocks=16, block_size=4)
    shared = list(range(1, 9))  # two full blocks
    a = make_request("a", shared + [20, 21, 22])
    assert bm.get_computed_blocks(a) == []
    assert bm.allocate_slots(a, a.num_tokens)
    assert bm.block_table("a") == [1, 2, 3]
    b = make_request("b", shared + [30])
    hits = bm.get_computed_blocks(b)
    assert hits == [1, 2]
    assert bm.allocate_slots(b, 1, hits)
    assert bm.block_table("b") == [1, 2, 4]
    assert bm.blocks[1].ref_count == 2 and bm.blocks[3].ref_count == 1
    # a third request diverging inside the second block hits only the first
    c = make_request("c", shared[:5] + [99, 98, 97, 96])
    assert bm.get_computed_blocks(c) == [1]


def test_hit_capped_below_the_last_token():
    """A prompt entirely in the cache still recomputes its last token (logits are needed)."""
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_request("a", list(range(8)))
    bm.allocate_slots(a, 8)
    b = make_request("b", list(range(8)))
    assert bm.get_computed_blocks(b) == [1]  # 7 tokens may hit: one full block


def test_freed_blocks_stay_cached_until_evicted():
    bm = BlockManager(num_blocks=4, block_size=4)  # usable 1..3
    a = make_request("a", list(range(8)) + [100])
    bm.allocate_slots(a, 9)
    bm.free(a)
    assert list(bm.free_queue) == [3, 2, 1]
    b = make_request("b", list(range(8)) + [200])
    hits = bm.get_computed_blocks(b)
    assert hits == [1, 2]  # still cached while free
    assert bm.allocate_slots(b, 1, hits)
    assert bm.block_table("b") == [1, 2, 3] and bm.num_free_blocks == 0
    bm.free(b)
    c = make_request("c", list(range(500, 512)))  # 3 fresh blocks: evicts the cached ones
    assert bm.get_computed_blocks(c) == []
    assert bm.allocate_slots(c, 12)
    assert bm.hash_to_block == {h: bid for h, bid in bm.hash_to_block.items() if bm.blocks[bid].ref_count}
    d = make_request("d", list(range(8)) + [1])
    assert bm.get_computed_blocks(d) == []


def test_hit_verifies_tokens_not_just_hash(monkeypatch):
    bm = BlockManager(num_blocks=8, block_size=2)
    monkeypatch.setattr(bm, "_hash", lambda parent, tokens: 42)  # every block collides
    a = make_request("a", [1, 2, 3])
    bm.allocate_slots(a, 3)
    b = make_request("b", [7, 8, 9])
    assert bm.get_computed_blocks(b) == []


def test_prompt_logprob_requests_skip_the_cache():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    bm.allocate_slots(a, 5)
    b = make_request("b", [1, 2, 3, 4, 5], prompt_logprobs=1)
    assert bm.get_computed_blocks(b) == []
