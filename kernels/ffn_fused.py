"""The fused ELAS FFN core: `sparse24(relu(a @ w_up.T) ** 2) @ w_down` in one Triton kernel that
never writes the (T, F) activation to memory.

Operands: a (T, K) is the up projection's input to its last factor (x for a dense up, x @ weight_in
for a low-rank one); w_up (F, K) is that factor (the dense `weight`, or `weight_out`); w_down (F, N)
is the down projection's first factor (`weight_in` [F, r], or a dense `weight` [hidden, F]
transposed, as a view). The caller applies a low-rank down's `weight_out` afterwards.

Each program owns a (BLOCK_T, BLOCK_N) output tile and a range of groups of 4 features. Per block of
BLOCK_G groups it computes the 4 pre-activation columns 4g + p (p = 0..3) as 4 `tl.dot`s over K,
rounds them to the activation dtype (as the reference's matmul output is), applies relu ** 2,
keeps the top 2 of every group (the partial last group, F % 4 features, stays dense; features past
F are masked to 0), and accumulates the 4 sparse columns @ rows 4g + p of w_down. Float32
accumulation throughout; the output has the dtype of `a`.

NOTE: the up projection is recomputed by every program along N (N / BLOCK_N of them, 1-2 at ELAS
ranks); for few tokens the groups are split across programs, each writing a float32 partial that is
summed afterwards (deterministic, no atomics).
NOTE: `h_out` (testing only) receives the kernel's own rounded pre-activations, so a test can
compare against the reference on exactly the values the kernel selected from: 2:4 selection is
discontinuous where two activations tie, and the kernel's float32 accumulation order differs from
the reference matmul's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .relu2_sparse24 import relu2, relu2_sparse24_ref, top2_of_4
from .triton_utils import check_operands, dot_acc, round_to, upcast_dots
from .triton_utils import num_splits as default_splits


def relu2_sparse24_ffn_ref(a: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                           two_by_four: bool = True) -> torch.Tensor:
    """Reference: (T, K) @ (F, K).T -> relu ** 2 -> 2:4 -> @ (F, N) -> (T, N), in the dtype of a."""
    return relu2_sparse24_ref(a @ w_up.T, two_by_four) @ w_down


@triton.jit
def _up_column(acc, a, wu_ptr, offs_f, f_mask, offs_k, k_mask, stride_wuf, stride_wuk,
               UPCAST: tl.constexpr):
    """acc + a (BLOCK_T, BLOCK_K) @ w_up[offs_f, offs_k].T (BLOCK_K, BLOCK_G)."""
    w = tl.load(wu_ptr + offs_f[None, :] * stride_wuf + offs_k[:, None] * stride_wuk,
                mask=f_mask[None, :] & k_mask[:, None], other=0.0)
    return dot_acc(a, w, acc, UPCAST)


@triton.jit
def _down_update(acc, y, wd_ptr, offs_f, f_mask, offs_n, n_mask, stride_wdf, stride_wdn,
                 UPCAST: tl.constexpr):
    """acc + y (BLOCK_T, BLOCK_G) @ w_down[offs_f, offs_n] (BLOCK_G, BLOCK_N)."""
    w = tl.load(wd_ptr + offs_f[:, None] * stride_wdf + offs_n[None, :] * stride_wdn,
                mask=f_mask[:, None] & n_mask[None, :], other=0.0)
    return dot_acc(y, w, acc, UPCAST)


@triton.jit
def _relu2_sparse24_ffn_kernel(
        a_ptr, wu_ptr, wd_ptr, out_ptr, h_ptr, num_tokens, width, num_groups, k, n, groups_per_split,
        stride_at, stride_ak, stride_wuf, stride_wuk, stride_wdf, stride_wdn,
        stride_os, stride_ot, stride_on, stride_ht, stride_hf,
        TWO_BY_FOUR: tl.constexpr, STORE_H: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_t, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    dtype = a_ptr.dtype.element_ty
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask, n_mask = offs_t < num_tokens, offs_n < n
    g_start = pid_s * groups_per_split  # NOTE: the last split may run masked blocks past the end
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, groups_per_split, BLOCK_G):
        offs_g = g_start + g0 + tl.arange(0, BLOCK_G)
        g_mask = offs_g < num_groups  # num_groups = cdiv(width, 4): the last may be partial (dense)
        f0, f1, f2, f3 = 4 * offs_g, 4 * offs_g + 1, 4 * offs_g + 2, 4 * offs_g + 3
        m0, m1 = g_mask & (f0 < width), g_mask & (f1 < width)
        m2, m3 = g_mask & (f2 < width), g_mask & (f3 < width)
        h0 = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.float32)
        h1 = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.float32)
        h2 = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.float32)
        h3 = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k
            x = tl.load(a_ptr + offs_t[:, None] * stride_at + offs_k[None, :] * stride_ak,
                        mask=t_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_T, BLOCK_K)
            h0 = _up_column(h0, x, wu_ptr, f0, m0, offs_k, k_mask, stride_wuf, stride_wuk, UPCAST)
            h1 = _up_column(h1, x, wu_ptr, f1, m1, offs_k, k_mask, stride_wuf, stride_wuk, UPCAST)
            h2 = _up_column(h2, x, wu_ptr, f2, m2, offs_k, k_mask, stride_wuf, stride_wuk, UPCAST)
            h3 = _up_column(h3, x, wu_ptr, f3, m3, offs_k, k_mask, stride_wuf, stride_wuk, UPCAST)
        if STORE_H:
            if pid_n == 0:
                h_row = h_ptr + offs_t[:, None] * stride_ht
                tm = t_mask[:, None]
                tl.store(h_row + f0[None, :] * stride_hf, round_to(h0, dtype), mask=tm & m0[None, :])
                tl.store(h_row + f1[None, :] * stride_hf, round_to(h1, dtype), mask=tm & m1[None, :])
                tl.store(h_row + f2[None, :] * stride_hf, round_to(h2, dtype), mask=tm & m2[None, :])
                tl.store(h_row + f3[None, :] * stride_hf, round_to(h3, dtype), mask=tm & m3[None, :])
        y0, y1, y2, y3 = relu2(h0, dtype), relu2(h1, dtype), relu2(h2, dtype), relu2(h3, dtype)
        if TWO_BY_FOUR:
            k0_, k1_, k2_, k3_ = top2_of_4(y0, y1, y2, y3)
            dense = (offs_g >= width // 4)[None, :]  # the partial last group stays dense
            y0 = tl.where(k0_ | dense, y0, 0.0)
            y1 = tl.where(k1_ | dense, y1, 0.0)
            y2 = tl.where(k2_ | dense, y2, 0.0)
            y3 = tl.where(k3_ | dense, y3, 0.0)
        acc = _down_update(acc, y0, wd_ptr, f0, m0, offs_n, n_mask, stride_wdf, stride_wdn, UPCAST)
        acc = _down_update(acc, y1, wd_ptr, f1, m1, offs_n, n_mask, stride_wdf, stride_wdn, UPCAST)
        acc = _down_update(acc, y2, wd_ptr, f2, m2, offs_n, n_mask, stride_wdf, stride_wdn, UPCAST)
        acc = _down_update(acc, y3, wd_ptr, f3, m3, offs_n, n_mask, stride_wdf, stride_wdn, UPCAST)
    out = out_ptr + pid_s * stride_os + offs_t[:, None] * stride_ot + offs_n[None, :] * stride_on
    tl.store(out, round_to(acc, out_ptr.dtype.element_ty), mask=t_mask[:, None] & n_mask[None, :])


def relu2_sparse24_ffn(a: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                       two_by_four: bool = True, splits: int | None = None,
                       h_out: torch.Tensor | None = None) -> torch.Tensor:
    """`relu2_sparse24_ffn_ref(a, w_up, w_down, two_by_four)` in one kernel. -> (T, N)

    `splits`: None picks one. `h_out` (T, F), testing only: receives the rounded pre-activations.
    """
    check_operands(a, w_up, w_down)
    (num_tokens, k), (width, n) = a.shape, w_down.shape
    assert w_up.shape == (width, k), (w_up.shape, a.shape, w_down.shape)
    if num_tokens == 0 or n == 0:
        return a.new_zeros(num_tokens, n)
    block_t = 16 if num_tokens <= 16 else 32 if num_tokens <= 32 else 64
    block_n = min(256, max(16, triton.next_power_of_2(n)))  # N = rank: the up projection runs once or twice
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    block_g = 16
    num_tiles = triton.cdiv(num_tokens, block_t) * triton.cdiv(n, block_n)
    num_blocks = triton.cdiv(triton.cdiv(width, 4), block_g)
    splits = min(splits or default_splits(a.device, num_tiles, num_blocks), num_blocks)
    groups_per_split = triton.cdiv(num_blocks, splits) * block_g
    splits = triton.cdiv(triton.cdiv(width, 4), groups_per_split)  # no empty split
    out = a.new_empty(num_tokens, n) if splits == 1 else torch.empty(
        splits, num_tokens, n, dtype=torch.float32, device=a.device)
    stride_os = 0 if splits == 1 else out.stride(0)
    if h_out is not None:
        check_operands(a, h_out)
        assert h_out.shape == (num_tokens, width), h_out.shape
    h = out if h_out is None else h_out
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(n, block_n), splits)
    _relu2_sparse24_ffn_kernel[grid](
        a, w_up, w_down, out, h, num_tokens, width, triton.cdiv(width, 4), k, n, groups_per_split,
        a.stride(0), a.stride(1), w_up.stride(0), w_up.stride(1), w_down.stride(0), w_down.stride(1),
        stride_os, out.stride(-2), out.stride(-1), h.stride(-2), h.stride(-1),
        TWO_BY_FOUR=two_by_four, STORE_H=h_out is not None, UPCAST=upcast_dots(a.dtype),
        BLOCK_T=block_t, BLOCK_G=block_g, BLOCK_K=block_k, BLOCK_N=block_n,
        num_warps=8 if block_t * block_n >= 8192 else 4)
    return out if splits == 1 else out.sum(0).to(a.dtype)
