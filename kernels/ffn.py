"""FFN backends: every way of computing the ELAS FFN `down(sparse24(relu(up(x)) ** 2))`.

A projection is passed as its factors `(weight_in, weight_out)`, computing
`x @ weight_in @ weight_out.T`, or `(None, weight)` for a dense `x @ weight.T`. Every backend takes
x (..., hidden) and returns (..., hidden) in the dtype of x, and computes the same function as
`ffn_reference`; the model picks one by name (design section 7). `FFN_BACKENDS` is the one registry
of backend names; `FFN_BACKEND_NAMES` adds "auto" (`ffn_tuning.py`), for configs and CLIs.

  dense     the best dense chain: on CUDA in 16-bit, the up GEMM with relu ** 2 and 2:4 in its
            epilogue (`gemm_relu2_sparse24.py`, one Triton kernel) then cuBLAS for the down
            projection; elsewhere (CPU, float32) the PyTorch reference.
  sparse24  the up GEMM's epilogue writes the compressed 2:4 activation, then a 2:4 GEMM with the
            down projection's first factor: for few tokens the row-skipping GEMV
            (`sparse24_gemv.py`), else cuSPARSELt on sparse tensor cores where a plan exists
            (`sparse24_cslt.py`), else the Triton 2:4 GEMM (`sparse24_matmul.py`).
  fused     one back-to-back Triton kernel from the up projection's last factor to the down
            projection's first factor (`ffn_fused.py`), never writing the (T, F) activation.
The first factor of a low-rank up and the second factor of a low-rank down run in PyTorch. The
Triton launchers are called as torch custom ops (`ops.py`): `torch.compile(fullgraph=True)` of a
model using any backend does not break its graph there.

The sparse backends refuse float16: relu(h) ** 2 overflows it above |h| = 255.9, and the inf then
turns into NaN in the 2:4 GEMM (inf * 0). The Triton backends run on CUDA, or on the CPU under
TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import ops
from .backends import FFN_BACKEND_NAMES
from .relu2_sparse24 import relu2_sparse24_ref

Factors = tuple["torch.Tensor | None", torch.Tensor]
FFNFn = Callable[[torch.Tensor, Factors, Factors, bool], torch.Tensor]


def project(x: torch.Tensor, factors: Factors) -> torch.Tensor:
    weight_in, weight_out = factors
    if weight_in is not None:
        x = x @ weight_in
    return x @ weight_out.T


def ffn_reference(x: torch.Tensor, up: Factors, down: Factors, two_by_four: bool) -> torch.Tensor:
    """Reference: PyTorch matmuls with the 2:4 mask applied. x (..., hidden) -> (..., hidden)."""
    return project(relu2_sparse24_ref(project(x, up), two_by_four), down)


def down_split(down: Factors) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The down projection as (first factor (F, N), second factor or None): y @ first [@ second.T]."""
    weight_in, weight_out = down
    return (weight_out.T, None) if weight_in is None else (weight_in, weight_out)


def _up_split(x: torch.Tensor, up: Factors) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, last factor (F, K)): a (T, K) is x, or x @ weight_in for a low-rank up."""
    weight_in, weight_out = up
    return (x if weight_in is None else x @ weight_in), weight_out


def _refuse_float16(x: torch.Tensor, backend: str) -> None:
    if x.dtype == torch.float16:
        raise ValueError(f"FFN backend {backend!r} refuses float16: relu(h) ** 2 overflows float16 above "
                         f"|h| = 255.9 and the 2:4 GEMM turns the inf into NaN; use bfloat16, or the dense backend")


def ffn_dense_chain(x: torch.Tensor, up: Factors, down: Factors, two_by_four: bool) -> torch.Tensor:
    """The epilogue-fused dense chain (any device Triton runs on): up GEMM + relu ** 2 + 2:4 in one
    kernel, then the down projection in PyTorch."""
    lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
    a, up_last = _up_split(x, up)
    z = project(torch.ops.elas.up_relu2_sparse24(a, up_last, two_by_four), down)
    return z.reshape(*lead, z.shape[-1])


def ffn_dense(x: torch.Tensor, up: Factors, down: Factors, two_by_four: bool) -> torch.Tensor:
    """The best dense chain: `ffn_dense_chain` on CUDA in 16-bit, else `ffn_reference`."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return ffn_dense_chain(x, up, down, two_by_four)
    return ffn_reference(x, up, down, two_by_four)


def ffn_sparse24(x: torch.Tensor, up: Factors, down: Factors, two_by_four: bool,
                 gemm: str = "auto") -> torch.Tensor:
    """Producer-then-2:4-GEMM backend. `gemm`: "auto" (see the module docstring), "gemv",
    "cusparselt" or "triton"."""
    if not two_by_four:  # NOTE: nothing is sparse: the dense chain is this backend's best
        return ffn_dense(x, up, down, two_by_four)
    _refuse_float16(x, "sparse24")
    lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
    a, up_last = _up_split(x, up)
    first, second = down_split(down)
    z = torch.ops.elas.sparse24_down(a, up_last, first, gemm)  # (T, N)
    if second is not None:
        z = z @ second.T
    return z.reshape(*lead, z.shape[-1])


def ffn_fused(x: torch.Tensor, up: Factors, down: Factors, two_by_four: bool) -> torch.Tensor:
    """One-kernel backend: the (T, F) activation lives only in registers."""
    _refuse_float16(x, "fused")
    lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
    a, up_last = _up_split(x, up)
    first, second = down_split(down)
    z = torch.ops.elas.relu2_sparse24_ffn(a, up_last, first, two_by_four)  # (T, N)
    if second is not None:
        z = z @ second.T
    return z.reshape(*lead, z.shape[-1])


FFN_BACKENDS: dict[str, FFNFn] = {"dense": ffn_dense, "sparse24": ffn_sparse24, "fused": ffn_fused}
assert FFN_BACKEND_NAMES == ("auto", *FFN_BACKENDS), "kernels/backends.py lists the backends"
sparse24_route = ops.sparse24_route
