"""FFN backends: every way of computing the ELAS FFN `down(sparse24(relu(up(x)) ** 2))`.

A projection is passed as its factors `(weight_in, weight_out)`, computing
`x @ weight_in @ weight_out.T`, or `(None, weight)` for a dense `x @ weight.T`. Every backend takes
x (..., hidden) and returns (..., hidden) in the dtype of x, and computes the same function as
`dense` (the reference); the model picks one by name (design section 7):

  dense     PyTorch matmuls with the 2:4 mask applied (CPU and GPU; the only autograd-able one).
  sparse24  up projection in PyTorch; one Triton kernel fuses relu ** 2, top-2-of-4 and compression
            (`relu2_sparse24.py`); the 2:4 GEMM with the down projection's first factor runs on
            cuSPARSELt for >= CSLT_MIN_TOKENS tokens where a probe says it works
            (`sparse24_cslt.py`), else in Triton (`sparse24_matmul.py`); a low-rank down's second
            factor in PyTorch.
  fused     one Triton kernel from the up projection's last factor to the down projection's first
            factor (`ffn_fused.py`), never writing the (T, F) activation; the first factor of a
            low-rank up and the second factor of a low-rank down in PyTorch.

The Triton backends run on CUDA, or on the CPU under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .ffn_fused import relu2_sparse24_ffn
from .relu2_sparse24 import relu2_sparse24_compress, relu2_sparse24_ref
from .sparse24_cslt import cslt_usable, sparse24_matmul_cslt
from .sparse24_matmul import sparse24_matmul

Factors = tuple["torch.Tensor | None", torch.Tensor]
# NOTE: cuSPARSELt pads M to 32 and plans per call; quoted measurements show 2:4 GEMMs losing to
# dense below ~64-512 rows (research notes on sparsity, section 6). A guess until bench_ffn.py measures it.
CSLT_MIN_TOKENS = 128
FFNFn = Callable[[torch.Tensor, Factors, Factors, bool], torch.Tensor]


def project(x: torch.Tensor, factors: Factors) -> torch.Tensor:
    weight_in, weight_out = factors
    if weight_in is not None:
        x = x @ weight_in
    return x @ weight_out.T


def ffn_dense(x: torch.Tensor, up: Factors, down: Factors, two_by_four: bool) -> torch.Tensor:
    """Reference: PyTorch matmuls with the 2:4 mask applied. x (T, hidden) -> (T, hidden)."""
    return project(relu2_sparse24_ref(project(x, up), two_by_four), down)


def _down_split(down: Factors) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The down projection as (first factor (F, N), second factor or None): y @ first [@ second.T]."""
    weight_in, weight_out = down
    return (weight_out.T, None) if weight_in is None else (weight_in, weight_out)


def ffn_sparse24(x: torch.Tensor, up: Factors, down: Factors, two_by_four: bool,
                 gemm: str = "auto") -> torch.Tensor:
    """Compress-then-GEMM backend. `gemm`: "triton", "cusparselt", or "auto" (cuSPARSELt where
    usable and T >= CSLT_MIN_TOKENS, else Triton)."""
    if not two_by_four:  # NOTE: nothing is sparse: the dense path is this backend's best
        return ffn_dense(x, up, down, two_by_four)
    lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
    h = project(x, up)  # (T, F)
    first, second = _down_split(down)
    use_cslt = gemm == "cusparselt" or (
        gemm == "auto" and h.shape[0] >= CSLT_MIN_TOKENS and cslt_usable(h.device, h.dtype))
    if use_cslt:
        z = sparse24_matmul_cslt(h, first)  # (T, N)
    else:
        assert gemm in ("auto", "triton"), gemm
        z = sparse24_matmul(relu2_sparse24_compress(h), first)  # (T, N)
    if second is not None:
        z = z @ second.T
    return z.reshape(*lead, z.shape[-1])


def ffn_fused(x: torch.Tensor, up: Factors, down: Factors, two_by_four: bool) -> torch.Tensor:
    """One-kernel backend: the (T, F) activation lives only in registers."""
    lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
    up_in, up_last = up
    a = x if up_in is None else x @ up_in  # (T, K): K = hidden or the up rank
    first, second = _down_split(down)
    z = relu2_sparse24_ffn(a, up_last, first, two_by_four)  # (T, N)
    if second is not None:
        z = z @ second.T
    return z.reshape(*lead, z.shape[-1])


FFN_BACKENDS: dict[str, FFNFn] = {"dense": ffn_dense, "sparse24": ffn_sparse24, "fused": ffn_fused}
