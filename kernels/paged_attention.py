"""Attention over a paged KV cache: the PyTorch reference (CPU path and test oracle).

Layout (shared with the engine): a layer's cache is `(2, num_blocks, block_size, num_kv_heads,
head_dim)`; token `t` of a sequence lives in slot `block_table[t // block_size] * block_size +
t % block_size`. A batch is flattened: sequence `i` owns query rows
`query_start_loc[i]:query_start_loc[i+1]`, which are the *last* `query_len` tokens of its
`seq_len`-token context (so query row `j` sits at position `seq_len - query_len + j` and attends
causally to every cached token up to it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def store_kvcache_ref(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """Write new keys/values (T, Hkv, D) into `kv_cache` at `slot_mapping` (T,).

    NOTE: padding rows point at the null block (block 0), never at -1, so the write needs no
    host-side filtering and can be captured in a CUDA graph.
    """
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)  # (2, num_slots, Hkv, D)
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def _gather(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the given blocks, (len(block_ids) * block_size, Hkv, D) each.

    NOTE: `index_select` on dim 0 copies whole blocks; advanced indexing `kv_cache[:, ids]` is about
    5x slower on the CPU for the same copy.
    """
    ids = block_ids.long()
    k, v = kv_cache[0].index_select(0, ids), kv_cache[1].index_select(0, ids)  # (n, bs, Hkv, D)
    return k.flatten(0, 1), v.flatten(0, 1)


@dataclass(slots=True)
class AttentionPlan:
    """What `paged_attention_ref` needs of a step's metadata, computed once per step and shared by
    every layer: the decode rows batched into one padded SDPA call (their flat block ids and length
    mask), and the other sequences' (first row, query length, seq length, block ids)."""

    decode_rows: torch.Tensor | None     # (Bd,) query rows of one-query sequences; None: every row
    decode_blocks: torch.Tensor | None   # (Bd * W,) int64 block ids, W of the longest of them
    decode_mask: torch.Tensor | None     # (Bd, 1, 1, W * block_size) bool: position < seq_len
    prefills: list[tuple[int, int, int, torch.Tensor]]

    @classmethod
    def build(cls, block_tables: torch.Tensor, query_lens: list[int], seq_lens: list[int],
              block_size: int) -> "AttentionPlan":
        device = block_tables.device
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        decode = [i for i, n in enumerate(query_lens) if n == 1]
        rows = blocks = mask = None
        if decode:
            lens = [seq_lens[i] for i in decode]
            width = -(-max(lens) // block_size)  # blocks needed by the longest sequence
            all_decode = len(decode) == len(query_lens)
            rows = None if all_decode else torch.tensor([starts[i] for i in decode], device=device)
            table = block_tables[:, :width] if all_decode else block_tables[decode, :width]
            blocks = table.flatten().long()
            positions = torch.arange(width * block_size, device=device)
            mask = (positions[None, :] < torch.tensor(lens, device=device)[:, None])[:, None, None, :]
        prefills = [(starts[i], n, s, block_tables[i, :-(-s // block_size)].long())
                    for i, (n, s) in enumerate(zip(query_lens, seq_lens)) if n > 1]
        return cls(rows, blocks, mask, prefills)


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                        query_lens: list[int], seq_lens: list[int], scale: float,
                        plan: AttentionPlan | None = None) -> torch.Tensor:
    """Causal attention of flattened queries (T, H, D) over the paged cache -> (T, H, D).

    `query_lens`/`seq_lens` are host lists (one entry per sequence); `plan` (built from them when
    not given) is how a model step shares that work across layers. Sequences with a single query
    (decode) are batched into one padded SDPA call; the others run one by one.
    """
    if plan is None:
        plan = AttentionPlan.build(block_tables, query_lens, seq_lens, kv_cache.shape[2])
    out = torch.empty_like(q)
    if plan.decode_blocks is not None:
        mask = plan.decode_mask
        qd = q if plan.decode_rows is None else q[plan.decode_rows]
        o = _masked_attention(qd, kv_cache, plan.decode_blocks, mask, scale)
        if plan.decode_rows is None:
            out = o
        else:
            out[plan.decode_rows] = o
    for start, n, s, blocks in plan.prefills:
        k, v = _gather(kv_cache, blocks)
        out[start:start + n] = causal_attention_ref(q[start:start + n], k[:s], v[:s], scale)
    return out


def _masked_attention(q: torch.Tensor, kv_cache: torch.Tensor, blocks: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """q (B, H, D), one query per sequence, over the flat `blocks` (B * W,) under `mask` (B, 1, 1, W * bs)."""
    batch = q.shape[0]
    num_kv_heads, head_dim = kv_cache.shape[3:]
    k, v = _gather(kv_cache, blocks)  # (B*W*bs, Hkv, D)
    k = k.view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)  # (B, Hkv, W*bs, D)
    v = v.view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale,
                                       enable_gqa=q.shape[1] != num_kv_heads)  # (B, H, 1, D)
    return o.squeeze(2)


def causal_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                         ) -> torch.Tensor:
    """q (n, H, D) are the last n of the s keys/values (s, Hkv, D) -> (n, H, D)."""
    n, s = q.shape[0], k.shape[0]
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H, n|s, D)
    gqa = q.shape[1] != k.shape[1]
    if n == s:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        mask = torch.ones(n, s, dtype=torch.bool, device=q.device).tril(s - n)
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o.transpose(0, 1)
