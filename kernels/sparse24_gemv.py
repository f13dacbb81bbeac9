"""Decode's 2:4 GEMM: a few tokens' pruned activation y (T, F) @ w (F, N) -> (T, N), reading only the
rows of `w` whose feature some token keeps (row skipping, as TEAL does for ReLU zeros).

For T <= GEMV_MAX_TOKENS the FFN is a weight-streaming problem: at one token 2:4 alone zeroes half
of the features, and squared ReLU's own zeros many more, so a row of `w` (N contiguous elements)
that every token drops is not read at all (the masked load issues no memory transactions).

Each program owns a BLOCK_N slice of the output for all T (<= 16) tokens and a range of feature
blocks (the features are split across programs to fill the GPU; float32 partials, summed by
`split_reduce.sum_splits`). Per block of BLOCK_F features it loads y (BLOCK_T, BLOCK_F), derives
which rows are live (any non-zero, NaN included), loads only those rows of w and accumulates
y @ w in float32 with one `tl.dot` (its M padded to 16 rows). The result has the dtype of y.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .split_reduce import sum_splits
from .triton_utils import check_operands, dot_acc, num_splits, round_to, upcast_dots

GEMV_MAX_TOKENS = 16  # the kernel's BLOCK_T: more tokens take a 2:4 GEMM


def sparse24_gemv_ref(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Reference: y (T, F) @ w (F, N) in the dtype of y."""
    return y @ w


# NOTE: `blocks_per_split` is never specialised (a constexpr 1 drops the loop, and ptxas then spills)
@triton.jit(do_not_specialize=["blocks_per_split"])
def _sparse24_gemv_kernel(
        y_ptr, w_ptr, out_ptr, num_tokens, width, n, blocks_per_split,
        stride_yt, stride_yf, stride_wf, stride_wn, stride_os, stride_ot,
        UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask, n_mask = offs_t < num_tokens, offs_n < n
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for i in range(0, blocks_per_split):
        offs_f = (pid_s * blocks_per_split + i) * BLOCK_F + tl.arange(0, BLOCK_F)
        f_mask = offs_f < width
        y = tl.load(y_ptr + offs_t[:, None] * stride_yt + offs_f[None, :] * stride_yf,
                    mask=t_mask[:, None] & f_mask[None, :], other=0.0)  # (BLOCK_T, BLOCK_F)
        live = tl.max((y != 0).to(tl.int32), axis=0) > 0  # (BLOCK_F,): rows some token keeps
        w = tl.load(w_ptr + offs_f[:, None] * stride_wf + offs_n[None, :] * stride_wn,
                    mask=(live & f_mask)[:, None] & n_mask[None, :], other=0.0)  # (BLOCK_F, BLOCK_N)
        acc = dot_acc(y, w, acc, UPCAST)
    out = out_ptr + pid_s * stride_os + offs_t[:, None] * stride_ot + offs_n[None, :]
    tl.store(out, round_to(acc, out_ptr.dtype.element_ty), mask=t_mask[:, None] & n_mask[None, :])


def sparse24_gemv(y: torch.Tensor, w: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """`sparse24_gemv_ref(y, w)` for T <= GEMV_MAX_TOKENS, skipping the rows no token keeps."""
    check_operands(y, w)
    (num_tokens, width), n = y.shape, w.shape[1]
    assert w.shape[0] == width, (y.shape, w.shape)
    assert num_tokens <= GEMV_MAX_TOKENS, f"sparse24_gemv takes at most {GEMV_MAX_TOKENS} tokens"
    if num_tokens == 0 or n == 0:
        return y.new_zeros(num_tokens, n)
    block_f, block_n = 64, min(64, max(16, triton.next_power_of_2(n)))
    num_tiles, num_blocks = triton.cdiv(n, block_n), triton.cdiv(width, block_f)
    splits = min(splits or num_splits(y.device, num_tiles, num_blocks, num_tokens), num_blocks)
    blocks_per_split = triton.cdiv(num_blocks, splits)
    splits = triton.cdiv(num_blocks, blocks_per_split)
    out = y.new_empty(num_tokens, n) if splits == 1 else torch.empty(
        splits, num_tokens, n, dtype=torch.float32, device=y.device)
    _sparse24_gemv_kernel[(num_tiles, splits)](
        y, w, out, num_tokens, width, n, blocks_per_split,
        y.stride(0), y.stride(1), w.stride(0), w.stride(1), 0 if splits == 1 else out.stride(0), out.stride(-2),
        UPCAST=upcast_dots(y.dtype), BLOCK_T=16, BLOCK_F=block_f, BLOCK_N=block_n, num_warps=4, num_stages=3)
    return out if splits == 1 else sum_splits(out, y.dtype)
