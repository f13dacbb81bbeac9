"""The reduction of split-K partials: float32 (S, T, N) -> (T, N) in the activation dtype, one
kernel (the sum and the cast together), summing the S splits in order (deterministic, no atomics).

Used by every kernel here that splits its reduction across programs for few tokens (the fused FFN,
the 2:4 GEMM, the decode GEMV); `triton_utils.num_splits` keeps S small.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import check_operands, round_to


def sum_splits_ref(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reference: the splits summed in order, in float32, cast to `dtype`."""
    acc = torch.zeros_like(partials[0])
    for p in partials:
        acc = acc + p
    return acc.to(dtype)


@triton.jit
def _sum_splits_kernel(p_ptr, out_ptr, num_splits, numel, stride_s, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, num_splits):
        acc += tl.load(p_ptr + s * stride_s + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, round_to(acc, out_ptr.dtype.element_ty), mask=mask)


def sum_splits(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`sum_splits_ref(partials, dtype)` for contiguous float32 partials (S, T, N)."""
    assert partials.dtype == torch.float32 and partials.dim() == 3 and partials.is_contiguous()
    num_splits, num_tokens, n = partials.shape
    out = torch.empty(num_tokens, n, dtype=dtype, device=partials.device)
    check_operands(out)
    numel = num_tokens * n
    if numel > 0:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(numel, block),)](
            partials, out, num_splits, numel, partials.stride(0), BLOCK=block)
    return out
