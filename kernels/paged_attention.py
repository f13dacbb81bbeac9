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
    """Write new keys/values (T, Hkv, D) into `kv_cache` at `slot_mapping` (T,); -1 skips."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)  # (2, num_slots, Hkv, D)
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, k, v = slot_mapping[valid], k[valid], v[valid]
    flat[0, slot_mapping] = k
    flat[1, slot_mapping] = v


def _gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous (num_tokens, Hkv, D) keys and values of one sequence."""
    block_size = kv_cache.shape[2]
    num_blocks = (num_tokens + block_size - 1) // block_size
    blocks = kv_cache[:, block_table[:num_blocks].long()]  # (2, nb, bs, Hkv, D)
    blocks = blocks.flatten(1, 2)[:, :num_tokens]
    return blocks[0], blocks[1]


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
        out[rows] = _decode_attention(q[rows], kv_cache, block_tables[decode],
                                      [seq_lens[i] for i in decode], scale)
    for i, (n, s) in enumerate(zip(query_lens, seq_lens)):
        if n == 1:
            continue
        k, v = _gather_kv(kv_cache, block_tables[i], s)
        qi = q[starts[i]:starts[i] + n]
        out[starts[i]:starts[i] + n] = causal_attention_ref(qi, k, v, scale)
    return out


def _decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: list[int], scale: float) -> torch.Tensor:
    """One query per sequence: q (B, H, D) against up to max(seq_lens) cached tokens."""
    block_size = kv_cache.shape[2]
    max_len = max(seq_lens)
    num_blocks = (max_len + block_size - 1) // block_size
    kv = kv_cache[:, block_tables[:, :num_blocks].long()]  # (2, B, nb, bs, Hkv, D)
    kv = kv.flatten(2, 3)[:, :, :max_len].transpose(2, 3)  # (2, B, Hkv, S, D)
    lens = torch.tensor(seq_lens, device=q.device)
    mask = torch.arange(max_len, device=q.device) < lens[:, None]  # (B, S)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), kv[0], kv[1], attn_mask=mask[:, None, None, :], scale=scale,
        enable_gqa=q.shape[1] != kv.shape[2])  # (B, H, 1, D)
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
