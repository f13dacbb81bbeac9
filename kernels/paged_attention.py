"""Attention over a paged KV cache: the PyTorch reference (CPU path and test oracle).

Layout (shared with the engine): a layer's cache is `(2, num_blocks, block_size, num_kv_heads,
head_dim)`; token `t` of a sequence lives in slot `block_table[t // block_size] * block_size +
t % block_size`. A batch is flattened: sequence `i` owns query rows
`query_start_loc[i]:query_start_loc[i+1]`, which are the *last* `query_len` tokens of its
`seq_len`-token context (so query row `j` sits at position `seq_len - query_len + j` and attends
causally to every cached token up to it).
"""

from __future__ import annotations

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


def _gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous (num_tokens, Hkv, D) keys and values of one sequence."""
    block_size = kv_cache.shape[2]
    k, v = _gather(kv_cache, block_table[:(num_tokens + block_size - 1) // block_size])
    return k[:num_tokens], v[:num_tokens]


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                        query_lens: list[int], seq_lens: list[int], scale: float) -> torch.Tensor:
    """Causal attention of flattened queries (T, H, D) over the paged cache -> (T, H, D).

    `query_lens`/`seq_lens` are host lists (one entry per sequence). Sequences with a single
    query (decode) are batched into one padded SDPA call; the others run one by one.
    """
    out = torch.empty_like(q)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    decode = [i for i, n in enumerate(query_lens) if n == 1]
    if decode:
        rows = torch.tensor([starts[i] for i in decode], device=q.device)
        lens = [seq_lens[i] for i in decode]
        width = -(-max(lens) // kv_cache.shape[2])  # blocks needed by the longest sequence
        out[rows] = decode_attention_ref(q[rows], kv_cache, block_tables[decode, :width],
                                         torch.tensor(lens, device=q.device), scale)
    for i, (n, s) in enumerate(zip(query_lens, seq_lens)):
        if n == 1:
            continue
        k, v = _gather_kv(kv_cache, block_tables[i], s)
        qi = q[starts[i]:starts[i] + n]
        out[starts[i]:starts[i] + n] = causal_attention_ref(qi, k, v, scale)
    return out


def decode_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence: q (B, H, D) against its first `seq_lens[b]` cached tokens.

    Attends over the whole width of `block_tables` (B, W) with a length mask, so shapes depend
    only on (B, W): no host syncs, safe to capture in a CUDA graph.
    """
    batch, width = block_tables.shape
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    k, v = _gather(kv_cache, block_tables.flatten())  # (B*W*bs, Hkv, D)
    k = k.view(batch, width * block_size, num_kv_heads, head_dim).transpose(1, 2)  # (B, Hkv, W*bs, D)
    v = v.view(batch, width * block_size, num_kv_heads, head_dim).transpose(1, 2)
    positions = torch.arange(width * block_size, device=q.device)
    mask = positions[None, :] < seq_lens[:, None]  # (B, W*bs)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale,
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
