"""The fused ELAS FFN core: `sparse24(relu(a @ w_up.T) ** 2) @ w_down` as one back-to-back GEMM
that never writes the (T, F) activation to memory.

Operands: a (T, K) is the up projection's input to its last factor (x for a dense up, x @ weight_in
for a low-rank one); w_up (F, K) is that factor (the dense `weight`, or `weight_out`); w_down (F, N)
is the down projection's first factor (`weight_in` [F, r], or a dense `weight` [hidden, F]
transposed, as a view). The caller applies a low-rank down's `weight_out` afterwards.

Each program owns a (BLOCK_T, BLOCK_N) output tile and walks the features in blocks of BLOCK_F
(>= 64): per block, one up dot (BLOCK_T, K) x (K, BLOCK_F) into a float32 tile whose columns are
permuted so that each group of 4 features lies in one thread's registers; the tile is rounded to
the activation dtype (as the reference's matmul output is), squared-ReLU'd and rounded again, split
into its (BLOCK_T, BLOCK_F / 4) groups for the top-2-of-4 selection (ties to the lower index; the
partial last group, F % 4 features, stays dense; features past F are 0), and fed straight from
registers into one down dot (BLOCK_T, BLOCK_F) x (BLOCK_F, BLOCK_N) with the matching (permuted)
rows of w_down. Float32 accumulation; the output has the dtype of `a`.

Invariants of the tiling (`_config`): with K <= RESIDENT_MAX_K (ELAS ranks up to 256) the
(BLOCK_T, K) tile of `a` is loaded once per program and stays in shared memory; at K = 512 (the 1b
rank, or a dense up) it streams with the weights in BLOCK_K steps. Weight loads are software-
pipelined (cp.async, 2 stages); warps are matched to the tile (4 at BLOCK_T = 64, 8 at 128); BLOCK_N
covers N <= 256 in one tile, so the up projection is computed once per token tile at ranks up to
256 and twice at 512 (a dense down, N = hidden, takes 64-wide tiles, its up projection computed
N / 64 times: fused is no fit there); the
features are split across programs (float32 partials, summed by `split_reduce.sum_splits`) only
for few tokens (`triton_utils.num_splits`). Tiles of fewer than 64 rows (decode) use mma.sync:
wgmma needs 64 rows per warpgroup.

NOTE: `h_out` (testing only) receives the kernel's own rounded pre-activations, so a test can
compare against the reference on exactly the values the kernel selected from: 2:4 selection is
discontinuous where two activations tie, and the kernel's float32 summation order differs from the
reference matmul's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .relu2_sparse24 import join_groups, permuted_features, relu2, relu2_sparse24_ref, sparsify_groups, split_groups
from .split_reduce import sum_splits
from .triton_utils import check_operands, dot_acc, num_splits, round_to, target_arch, upcast_dots, warps_for

RESIDENT_MAX_K = 256  # the (BLOCK_T, K) input tile stays in shared memory up to this K
LARGE_TILE_TOKENS = 4096  # above this many tokens, 128-row tiles (8 warps), else 64 (4 warps)


def relu2_sparse24_ffn_ref(a: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                           two_by_four: bool = True) -> torch.Tensor:
    """Reference: (T, K) @ (F, K).T -> relu ** 2 -> 2:4 -> @ (F, N) -> (T, N), in the dtype of a."""
    return relu2_sparse24_ref(a @ w_up.T, two_by_four) @ w_down


# NOTE: `blocks_per_split` is never specialised (a constexpr 1 drops the loop, and ptxas then spills)
@triton.jit(do_not_specialize=["blocks_per_split"])
def _relu2_sparse24_ffn_kernel(
        a_ptr, wu_ptr, wd_ptr, out_ptr, h_ptr, num_tokens, width, k, n, blocks_per_split,
        stride_at, stride_ak, stride_wuf, stride_wuk, stride_wdf, stride_wdn,
        stride_os, stride_ot, stride_on, stride_ht,
        TWO_BY_FOUR: tl.constexpr, STORE_H: tl.constexpr, UPCAST: tl.constexpr, RESIDENT: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_t, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    dtype = a_ptr.dtype.element_ty
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask, n_mask = offs_t < num_tokens, offs_n < n
    cols = permuted_features(BLOCK_F)  # feature offset of each column of the (BLOCK_T, BLOCK_F) tile
    if RESIDENT:  # BLOCK_K >= k: the whole input row block, once
        offs_k = tl.arange(0, BLOCK_K)
        x = tl.load(a_ptr + offs_t[:, None] * stride_at + offs_k[None, :] * stride_ak,
                    mask=t_mask[:, None] & (offs_k < k)[None, :], other=0.0)  # (BLOCK_T, BLOCK_K)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    first_block = pid_s * blocks_per_split  # NOTE: the last split may run masked blocks past F
    for i in range(0, blocks_per_split):
        offs_f = (first_block + i) * BLOCK_F + cols
        f_mask = offs_f < width
        if RESIDENT:
            w = tl.load(wu_ptr + offs_f[None, :] * stride_wuf + offs_k[:, None] * stride_wuk,
                        mask=f_mask[None, :] & (offs_k < k)[:, None], other=0.0)  # (BLOCK_K, BLOCK_F)
            h = dot_acc(x, w, tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32), UPCAST)
        else:
            h = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
            for k0 in range(0, k, BLOCK_K):
                offs_kk = k0 + tl.arange(0, BLOCK_K)
                kk_mask = offs_kk < k
                xk = tl.load(a_ptr + offs_t[:, None] * stride_at + offs_kk[None, :] * stride_ak,
                             mask=t_mask[:, None] & kk_mask[None, :], other=0.0)
                w = tl.load(wu_ptr + offs_f[None, :] * stride_wuf + offs_kk[:, None] * stride_wuk,
                            mask=f_mask[None, :] & kk_mask[:, None], other=0.0)
                h = dot_acc(xk, w, h, UPCAST)
        if STORE_H:
            if pid_n == 0:
                tl.store(h_ptr + offs_t[:, None] * stride_ht + offs_f[None, :], round_to(h, dtype),
                         mask=t_mask[:, None] & f_mask[None, :])
        y = relu2(h, dtype)  # (BLOCK_T, BLOCK_F), float32 holding DTYPE values
        if TWO_BY_FOUR:
            m0, m1, m2, m3 = split_groups(y, BLOCK_T, BLOCK_F, True)
            offs_g = (first_block + i) * (BLOCK_F // 4) + tl.arange(0, BLOCK_F // 4)
            m0, m1, m2, m3 = sparsify_groups(m0, m1, m2, m3, (offs_g >= width // 4)[None, :])
            y = join_groups(m0, m1, m2, m3, BLOCK_T, BLOCK_F, True)
        wd = tl.load(wd_ptr + offs_f[:, None] * stride_wdf + offs_n[None, :] * stride_wdn,
                     mask=f_mask[:, None] & n_mask[None, :], other=0.0)  # (BLOCK_F, BLOCK_N)
        acc = dot_acc(y.to(dtype), wd, acc, UPCAST)
    out = out_ptr + pid_s * stride_os + offs_t[:, None] * stride_ot + offs_n[None, :] * stride_on
    tl.store(out, round_to(acc, out_ptr.dtype.element_ty), mask=t_mask[:, None] & n_mask[None, :])


class FusedConfig(NamedTuple):
    block_t: int
    block_f: int
    block_k: int
    block_n: int
    resident: bool
    num_warps: int
    num_stages: int


def _config(num_tokens: int, k: int, n: int, dtype: torch.dtype, down_row_major: bool, arch: int) -> FusedConfig:
    """The tiling for T tokens, input width K, output width N, on sm`arch` (module docstring).

    Chosen from ahead-of-time compiles (`benchmarks/inspect_kernels.py`): the largest tiles that
    compile to wgmma (sm90) or mma.sync (sm80) without spills and fit shared memory. On sm80 the
    mma.sync operands live in registers: N tiles of 128 (64 at K = 512).
    """
    if dtype == torch.float32:  # NOTE: FMA dots (no tensor cores): small tiles, or they spill
        return FusedConfig(16, 32, 32, min(64, max(16, triton.next_power_of_2(n))), False, 4, 2)
    # NOTE: a resident (BLOCK_T, 512) input plus double-buffered (512, 64) weight tiles exceeds
    # shared memory (and registers at BLOCK_N = 256): K = 512 streams its input with the weights,
    # in 128-row tiles (8 warps; 64-row ones spill there)
    # NOTE: a dense down's weight.T is column-major: its tiles load transposed and take more
    # registers (64-wide N tiles, 128-row ones above 32 tokens: Triton 3.6 spills otherwise)
    resident = k <= RESIDENT_MAX_K
    hopper = arch >= 90
    large = num_tokens > (LARGE_TILE_TOKENS if resident and hopper and down_row_major else 32)
    block_t = 16 if num_tokens <= 16 else 32 if num_tokens <= 32 else 128 if large else 64
    widest = (256 if hopper else 128 if resident or block_t <= 32 else 64) if down_row_major else 64
    block_n = min(widest, max(16, triton.next_power_of_2(n)))
    block_k = max(16, triton.next_power_of_2(k)) if resident else 64
    return FusedConfig(block_t, 64, block_k, block_n, resident, warps_for(block_t), 2)


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
    cfg = _config(num_tokens, k, n, a.dtype, w_down.stride(1) == 1, target_arch(a.device))
    num_tiles = triton.cdiv(num_tokens, cfg.block_t) * triton.cdiv(n, cfg.block_n)
    num_blocks = triton.cdiv(width, cfg.block_f)
    splits = min(splits or num_splits(a.device, num_tiles, num_blocks, num_tokens), num_blocks)
    blocks_per_split = triton.cdiv(num_blocks, splits)
    splits = triton.cdiv(num_blocks, blocks_per_split)  # no empty split
    out = a.new_empty(num_tokens, n) if splits == 1 else torch.empty(
        splits, num_tokens, n, dtype=torch.float32, device=a.device)
    if h_out is not None:
        check_operands(a, h_out)
        assert h_out.shape == (num_tokens, width), h_out.shape
    h = out if h_out is None else h_out
    grid = (triton.cdiv(num_tokens, cfg.block_t), triton.cdiv(n, cfg.block_n), splits)
    _relu2_sparse24_ffn_kernel[grid](
        a, w_up, w_down, out, h, num_tokens, width, k, n, blocks_per_split,
        a.stride(0), a.stride(1), w_up.stride(0), w_up.stride(1), w_down.stride(0), w_down.stride(1),
        0 if splits == 1 else out.stride(0), out.stride(-2), out.stride(-1), h.stride(-2),
        TWO_BY_FOUR=two_by_four, STORE_H=h_out is not None, UPCAST=upcast_dots(a.dtype),
        RESIDENT=cfg.resident, BLOCK_T=cfg.block_t, BLOCK_F=cfg.block_f, BLOCK_K=cfg.block_k,
        BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out if splits == 1 else sum_splits(out, a.dtype)
