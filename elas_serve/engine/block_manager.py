"""Paged KV-cache bookkeeping: block ids, reference counts, LRU free list, prefix caching.

Pure Python; knows request token ids but no tensors. Invariants:
- block 0 is the null block: never handed out; padded batch rows write their KV there;
- a block is in `free_queue` iff its `ref_count` is 0; free blocks keep their content and hash
  (they can still be hit) until they are popped for reuse, which evicts the hash;
- a block gets a hash once it is full of known tokens (registered when the tokens are scheduled,
  i.e. written in this step). The hash chains the parent block's hash with the block's tokens and
  hits are verified against the stored tokens, so a hash collision can never alias content;
- freed blocks join the queue tail in reverse order (a sequence's tail is evicted first); blocks
  with no hash join the head (nothing to keep).
"""

from __future__ import annotations

from collections import OrderedDict

from .request import Request

NULL_BLOCK = 0


class Block:
    __slots__ = ("block_id", "ref_count", "block_hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (one is the null block)")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.req_blocks: dict[str, list[int]] = {}
        self.req_hashes: dict[str, list[int]] = {}  # chain hashes of each request's full blocks

    @property
    def num_usable_blocks(self) -> int:
        return len(self.blocks) - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks referenced by a request (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def block_table(self, request_id: str) -> list[int]:
        return self.req_blocks.get(request_id, [])

    def _hash(self, parent: int | None, tokens: tuple[int, ...]) -> int:
        return hash((parent, tokens))

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Leading blocks of `req` already in the cache (at most `num_tokens - 1` tokens, so the
        last token is always computed and yields logits). Pure: counts and changes nothing."""
        if not self.enable_prefix_caching or req.wants_prompt_logprobs:
            return []
        hits: list[int] = []
        parent = None
        bs = self.block_size
        for i in range((req.num_tokens - 1) // bs):
            tokens = tuple(req.all_token_ids[i * bs:(i + 1) * bs])
            h = self._hash(parent, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
            parent = h
        return hits

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed_blocks: list[int] | None = None) -> bool:
        """Give `req` blocks for `num_new_tokens` more tokens after its computed ones (and after
        `computed_blocks`, prefix-cache hits that become its leading blocks). All or nothing."""
        computed_blocks = computed_blocks or []
        blocks = self.req_blocks.setdefault(req.request_id, [])
        num_total = req.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        num_needed = -(-num_total // self.block_size) - len(blocks) - len(computed_blocks)
        num_hits_in_free = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        if num_needed > self.num_free_blocks - num_hits_in_free:
            if not blocks:
                del self.req_blocks[req.request_id]
            return False
        for block_id in computed_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
        blocks.extend(computed_blocks)
        for _ in range(max(num_needed, 0)):
            blocks.append(self._pop_free_block())
        if self.enable_prefix_caching:
            self._register_full_blocks(req, num_total)
        return True

    def _pop_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict its cached content
            if self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
            block.block_hash = block.token_ids = None
        block.ref_count = 1
        return block_id

    def _register_full_blocks(self, req: Request, num_tokens: int) -> None:
        hashes = self.req_hashes.setdefault(req.request_id, [])
        blocks = self.req_blocks[req.request_id]
        bs = self.block_size
        for i in range(len(hashes), min(num_tokens, req.num_tokens) // bs):
            tokens = tuple(req.all_token_ids[i * bs:(i + 1) * bs])
            h = self._hash(hashes[-1] if hashes else None, tokens)
            hashes.append(h)
            block = self.blocks[blocks[i]]
            if block.block_hash is None:
                block.block_hash, block.token_ids = h, tokens
                self.hash_to_block.setdefault(h, block.block_id)

    def free(self, req: Request) -> None:
        """Release every block of `req` (finished, aborted or preempted)."""
        self.req_hashes.pop(req.request_id, None)
        for block_id in reversed(self.req_blocks.pop(req.request_id, [])):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.block_hash is None:
                    self.free_queue.move_to_end(block_id, last=False)
