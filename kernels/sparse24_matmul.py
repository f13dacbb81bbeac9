"""Sparse-dense GEMM of a compressed 2:4 activation: `Sparse24` (T, F) @ w (F, N) -> (T, N).

The activation comes in the `Sparse24` layout of `relu2_sparse24.py` (values (T, 2G), int16 meta
(T, ceil(G/4)), dense tail (T, F % 4)); `w` is any strided (F, N) matrix: the down projection's
`weight_in` [F, r], or a dense down `weight` [hidden, F] transposed (a view, never copied).

Each program owns a (BLOCK_T, BLOCK_N) output tile and a range of groups. Per block of BLOCK_G
groups it loads the kept values and nibbles once, and for each position p of the 4 in a group
expands the (BLOCK_T, BLOCK_G) activation column 4g + p in registers (the kept value whose index
is p, else 0) and multiplies it with the matching rows 4g + p of `w` by `tl.dot`. The dense tail
is added as up to 3 rank-1 updates. Accumulation is float32; the result has the activation dtype.

NOTE: mainline Triton has no sparse-tensor-core dot, so this kernel saves memory traffic (1.125
instead of 2 bytes per bf16 activation element), not tensor-core FLOPs; the sparse tensor-core
path is cuSPARSELt (`sparse24_cslt.py`).
NOTE: for few tokens the reduction over groups is split across programs (`num_splits`), each
writing a float32 partial that `split_reduce.sum_splits` sums, deterministically. Warps are matched
to the tile (`warps_for`); values are read as one contiguous (BLOCK_T, 2 BLOCK_G) tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .relu2_sparse24 import Sparse24, sparse24_decompress_ref
from .split_reduce import sum_splits
from .triton_utils import check_operands, dot_acc, num_splits, round_to, upcast_dots, warps_for


def sparse24_matmul_ref(a: Sparse24, w: torch.Tensor) -> torch.Tensor:
    """Reference: decompress, then a dense matmul in the activation dtype. (T, F) @ (F, N)."""
    return sparse24_decompress_ref(a) @ w


# NOTE: `groups_per_split` is never specialised (a constexpr 1 drops the loop, and ptxas then spills)
@triton.jit(do_not_specialize=["groups_per_split"])
def _sparse24_matmul_kernel(
        values_ptr, meta_ptr, tail_ptr, w_ptr, out_ptr, num_tokens, num_groups, n, groups_per_split,
        stride_vt, stride_mt, stride_tt, stride_wf, stride_wn, stride_os, stride_ot, stride_on,
        TAIL: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_t, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask, n_mask = offs_t < num_tokens, offs_n < n
    g_start = pid_s * groups_per_split  # NOTE: the last split may run masked blocks past the end
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, groups_per_split, BLOCK_G):
        offs_g = g_start + g0 + tl.arange(0, BLOCK_G)
        g_mask = offs_g < num_groups
        mask = t_mask[:, None] & g_mask[None, :]  # (BLOCK_T, BLOCK_G)
        word = tl.load(meta_ptr + offs_t[:, None] * stride_mt + (offs_g // 4)[None, :], mask=mask, other=0)
        nibble = (word.to(tl.int32) >> (4 * (offs_g % 4))[None, :]) & 0xF
        i0, i1 = nibble & 3, nibble >> 2  # kept positions, i0 < i1
        offs_v = 2 * g_start + 2 * g0 + tl.arange(0, 2 * BLOCK_G)
        v = tl.load(values_ptr + offs_t[:, None] * stride_vt + offs_v[None, :],
                    mask=t_mask[:, None] & (offs_v < 2 * num_groups)[None, :], other=0.0)
        v0, v1 = tl.split(tl.reshape(v, (BLOCK_T, BLOCK_G, 2)))  # (BLOCK_T, BLOCK_G) each
        w_mask = g_mask[:, None] & n_mask[None, :]
        for p in tl.static_range(4):
            a = tl.where(i0 == p, v0, tl.where(i1 == p, v1, 0.0))  # dense column 4g + p
            w = tl.load(w_ptr + (4 * offs_g + p)[:, None] * stride_wf + offs_n[None, :] * stride_wn,
                        mask=w_mask, other=0.0)  # (BLOCK_G, BLOCK_N)
            acc = dot_acc(a, w, acc, UPCAST)
    if TAIL > 0:
        if pid_s == 0:
            for j in tl.static_range(TAIL):
                y = tl.load(tail_ptr + offs_t * stride_tt + j, mask=t_mask, other=0.0).to(tl.float32)
                w_row = w_ptr + (4 * num_groups + j) * stride_wf
                w_j = tl.load(w_row + offs_n * stride_wn, mask=n_mask, other=0.0)
                acc += y[:, None] * w_j.to(tl.float32)[None, :]
    out = out_ptr + pid_s * stride_os + offs_t[:, None] * stride_ot + offs_n[None, :] * stride_on
    tl.store(out, round_to(acc, out_ptr.dtype.element_ty), mask=t_mask[:, None] & n_mask[None, :])


def _blocks(num_tokens: int, n: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_G, BLOCK_N), from ahead-of-time compiles (`inspect_kernels.py`): 64-row
    tiles spill with 32 groups per step; 64-wide N tiles crash Triton 3.9's compiler here."""
    block_t = 16 if num_tokens <= 16 else 32 if num_tokens <= 32 else 64
    if dtype == torch.float32:  # NOTE: FMA dots: small tiles, or they spill
        return min(block_t, 32), 16, min(32, max(16, triton.next_power_of_2(n)))
    return block_t, 16, min(128, max(16, triton.next_power_of_2(n)))


def sparse24_matmul(a: Sparse24, w: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """`sparse24_matmul_ref(a, w)` with float32 accumulation. `splits`: None picks one."""
    values, meta, tail = a
    check_operands(values, tail, w)
    num_tokens, groups = values.shape[0], values.shape[1] // 2
    assert meta.dtype == torch.int16 and meta.shape == (num_tokens, triton.cdiv(groups, 4)), meta.shape
    assert meta.device == values.device and values.stride(1) == 1 and meta.stride(1) == 1
    assert tail.shape[0] == num_tokens and w.shape[0] == a.width, (tail.shape, w.shape, a.width)
    n = w.shape[1]
    if num_tokens == 0 or n == 0:
        return values.new_zeros(num_tokens, n)
    block_t, block_g, block_n = _blocks(num_tokens, n, values.dtype)
    num_tiles = triton.cdiv(num_tokens, block_t) * triton.cdiv(n, block_n)
    num_blocks = max(1, triton.cdiv(groups, block_g))
    splits = min(splits or num_splits(values.device, num_tiles, num_blocks, num_tokens), num_blocks)
    groups_per_split = triton.cdiv(num_blocks, splits) * block_g
    splits = max(1, triton.cdiv(groups, groups_per_split))  # no empty split
    out = values.new_empty(num_tokens, n) if splits == 1 else torch.empty(
        splits, num_tokens, n, dtype=torch.float32, device=values.device)
    stride_os = 0 if splits == 1 else out.stride(0)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(n, block_n), splits)
    _sparse24_matmul_kernel[grid](
        values, meta, tail, w, out, num_tokens, groups, n, groups_per_split,
        values.stride(0), meta.stride(0), tail.stride(0), w.stride(0), w.stride(1),
        stride_os, out.stride(-2), out.stride(-1),
        TAIL=tail.shape[1], UPCAST=upcast_dots(values.dtype),
        BLOCK_T=block_t, BLOCK_G=block_g, BLOCK_N=block_n,
        num_warps=warps_for(block_t))
    return out if splits == 1 else sum_splits(out, values.dtype)
