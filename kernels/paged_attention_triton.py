"""Paged attention in Triton: one kernel for prefill, chunked prefill and decode over block tables.

Owns `paged_attention` (the launcher, registered as the custom op `elas_serve::paged_attention` so
torch.compile keeps it in one graph) and its kernel; the PyTorch reference is
`paged_attention.paged_attention_ref` (same layout and row convention, see that module).

The batch is ragged and described by device tensors only: sequence i owns query rows
`query_start_loc[i]:query_start_loc[i+1]`, the last of its `seq_lens[i]` tokens, whose keys and
values are already in the cache (store first, then attend). One program handles BLOCK_Q queries of
one sequence for all QUERIES_PER_KV query heads sharing one KV head (GQA), so each key/value tile is
loaded once for BLOCK_M = BLOCK_Q * QUERIES_PER_KV rows. It walks the keys up to its last query's
position only (loop bound from `seq_lens`, never the block-table width), causal inside the chunk,
with an online softmax in float32. The grid is `(T // BLOCK_Q + B, Hkv)`, an upper bound on the
q blocks known from shapes alone (as vLLM's unified Triton attention does): programs past their
sequence's queries exit at once. No host sync anywhere, so it can be captured in a CUDA graph.
Padded graph rows (block table of null blocks, seq_len 1) read slot 0 of the null block.

A model step calls (all device tensors, int32 metadata):
    store_kvcache(k, v, kv_cache, slot_mapping)  # kv_cache_store.py
    o = paged_attention(q, kv_cache, block_tables, query_start_loc, seq_lens, scale)
Tile sizes follow from shapes alone (`launch_config`); one kernel serves every batch (no split of
the keys across programs: a decode of few long sequences runs B * Hkv programs).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_utils import KERNEL_DTYPES, dot_acc, interpreting, round_to, upcast_dots


@triton.jit
def _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence owning q block `q_block`: sequence i's q blocks start at start_i // BLOCK_Q + i."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_kernel(
        q_ptr, cache_ptr, out_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
        scale_log2, num_seqs,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kv, stride_block, stride_slot, stride_head, stride_table,
        QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,
        UPCAST: tl.constexpr):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local = q_block - (q_start // BLOCK_Q + seq)  # this program's q block within the sequence
    if local * BLOCK_Q >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len

    rows = tl.arange(0, BLOCK_M)  # row r: query local*BLOCK_Q + r // QPK, head kv_head*QPK + r % QPK
    qi = local * BLOCK_Q + rows // QUERIES_PER_KV
    head = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
    row_ok = (rows < BLOCK_Q * QUERIES_PER_KV) & (qi < query_len)
    position = context_len + qi  # (BLOCK_M,) absolute position of each row's query
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    token = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, D)

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    denom = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    # NOTE: key 0 is in the first tile and visible to every row, so `m` is finite after it and
    # no row (masked ones included) ever computes exp2(-inf - -inf).
    num_keys = tl.minimum(context_len + (local + 1) * BLOCK_Q, seq_len)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    k_base = cache_ptr + kv_head * stride_head
    for n0 in range(0, num_keys, TILE_N):
        offs_n = n0 + tl.arange(0, TILE_N)
        n_ok = offs_n < num_keys
        block = tl.load(table + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        slot = block * stride_block + (offs_n % BLOCK_SIZE) * stride_slot  # (TILE_N,)
        k = tl.load(k_base + slot[None, :] + offs_d[:, None], mask=d_ok[:, None] & n_ok[None, :],
                    other=0.0)  # (D, TILE_N)
        s = dot_acc(q, k, tl.zeros([BLOCK_M, TILE_N], dtype=tl.float32), UPCAST) * scale_log2
        visible = (offs_n[None, :] <= position[:, None]) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])  # (BLOCK_M, TILE_N)
        alpha = tl.exp2(m - m_new)
        denom = denom * alpha + tl.sum(p, axis=1)
        v = tl.load(k_base + stride_kv + slot[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)  # (TILE_N, D)
        acc = dot_acc(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
        m = m_new
    out = acc / denom[:, None]
    tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             round_to(out, out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def launch_config(num_tokens: int, num_seqs: int, queries_per_kv: int) -> dict[str, int]:
    """Tile sizes from shapes only (graph and compile safe): decode-only batches (T == B, every
    query_len is 1) take 16-row programs, batches with a prefill 64-row ones."""
    decode = num_tokens == num_seqs
    block_m = max(16 if decode else 64, triton.next_power_of_2(queries_per_kv))
    return {"BLOCK_M": block_m, "BLOCK_Q": block_m // queries_per_kv, "TILE_N": 64 if decode else 32,
            "num_warps": 4}


def _check(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
           query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """Shapes, dtypes and devices (what a fake tensor has too); values are the caller's contract."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache must be (2, num_blocks, block_size, num_kv_heads, head_dim), "
                         f"got {tuple(kv_cache.shape)}")
    num_kv_heads, head_dim = kv_cache.shape[3:]
    if q.dim() != 3 or q.shape[2] != head_dim or q.shape[1] % num_kv_heads:
        raise ValueError(f"q must be (T, H, {head_dim}) with H a multiple of num_kv_heads={num_kv_heads}, "
                         f"got {tuple(q.shape)}")
    if q.dtype not in KERNEL_DTYPES or kv_cache.dtype != q.dtype:
        raise ValueError(f"q and kv_cache need one dtype of {KERNEL_DTYPES}, got {q.dtype} and {kv_cache.dtype}")
    num_seqs = block_tables.shape[0]
    for name, t, shape in (("block_tables", block_tables, (num_seqs, block_tables.shape[-1])),
                           ("query_start_loc", query_start_loc, (num_seqs + 1,)),
                           ("seq_lens", seq_lens, (num_seqs,))):
        if t.dim() != len(shape) or tuple(t.shape) != shape or t.dtype != torch.int32:
            raise ValueError(f"{name} must be {shape} int32, got {tuple(t.shape)} {t.dtype}")
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("q and kv_cache need a contiguous last (head_dim) dimension")
    if not (block_tables.stride(-1) == 1 and query_start_loc.is_contiguous() and seq_lens.is_contiguous()):
        raise ValueError("block_tables rows, query_start_loc and seq_lens must be contiguous")
    devices = {t.device for t in (q, kv_cache, block_tables, query_start_loc, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError("Triton paged attention needs CUDA, or TRITON_INTERPRET=1 on the CPU")


@torch.library.custom_op("elas_serve::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of flattened queries q (T, H, D) over the paged cache -> (T, H, D), q's dtype.

    kv_cache (2, num_blocks, block_size, Hkv, D) with q's dtype; block_tables (B, W) int32;
    query_start_loc (B+1,) int32 (0, cumulative query lengths; last == T); seq_lens (B,) int32,
    context length after this step, >= the sequence's query length. Every query/key/value must be
    in the cache already (`store_kvcache` first). Equals `paged_attention_ref` up to rounding.
    """
    _check(q, kv_cache, block_tables, query_start_loc, seq_lens)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = block_tables.shape[0]
    if num_tokens == 0:
        return out
    num_kv_heads = kv_cache.shape[3]
    qpk = num_heads // num_kv_heads
    cfg = launch_config(num_tokens, num_seqs, qpk)
    grid = (num_tokens // cfg["BLOCK_Q"] + num_seqs, num_kv_heads)
    _paged_attention_kernel[grid](
        q, kv_cache, out, block_tables, query_start_loc, seq_lens, scale * math.log2(math.e), num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        QUERIES_PER_KV=qpk, HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=kv_cache.shape[2], BLOCK_Q=cfg["BLOCK_Q"], BLOCK_M=cfg["BLOCK_M"], TILE_N=cfg["TILE_N"],
        UPCAST=upcast_dots(q.dtype), num_warps=cfg["num_warps"])
    return out


@paged_attention.register_fake
def _paged_attention_fake(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                          query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    _check(q, kv_cache, block_tables, query_start_loc, seq_lens)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
