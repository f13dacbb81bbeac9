"""The Triton launchers the FFN backends call, as torch custom ops (`torch.ops.elas.*`), each with
a fake (meta) implementation, so that `torch.compile(fullgraph=True)` of a model using any backend
traces through them without a graph break.

Each op is opaque to the compiler: its body (the launcher, and for `sparse24_down` the choice among
the decode GEMV, cuSPARSELt and the Triton 2:4 GEMM) runs eagerly, at run time, on whatever device
the inputs are on (CUDA, or the CPU under the Triton interpreter). Ops return fresh tensors and
mutate nothing. `torch.library.custom_op` exists with this signature on torch >= 2.4 (2.11 and
2.13 included).
"""

from __future__ import annotations

import torch

from .cslt_layout import padded_shape
from .ffn_fused import relu2_sparse24_ffn
from .gemm_relu2_sparse24 import up_relu2_sparse24, up_relu2_sparse24_compress
from .sparse24_cslt import cslt_supported, device_arch, plan_for, sparse24_matmul_cslt
from .sparse24_gemv import GEMV_MAX_TOKENS, sparse24_gemv
from .sparse24_matmul import sparse24_matmul

# NOTE: at most this many tokens never take cuSPARSELt: quoted measurements show 2:4 GEMMs losing
# to dense below ~64-512 rows (research notes on sparsity, section 6); a power of two, so that
# `auto`'s token buckets (b/2, b] never straddle it. `auto` measures where it pays.
CSLT_MAX_SKIP_TOKENS = 64
SPARSE24_GEMMS = ("auto", "gemv", "cusparselt", "triton")


def sparse24_route(num_tokens: int, dtype: torch.dtype, cslt: bool, gemm: str = "auto") -> str:
    """Which 2:4 GEMM `sparse24` runs: "gemv" (few tokens), "cusparselt" (where `cslt` says a
    plan exists) or "triton"."""
    if gemm not in SPARSE24_GEMMS:
        raise ValueError(f"unknown sparse24 GEMM {gemm!r} (one of {', '.join(SPARSE24_GEMMS)})")
    if gemm != "auto":
        return gemm
    if num_tokens <= GEMV_MAX_TOKENS:
        return "gemv"
    return "cusparselt" if cslt and num_tokens > CSLT_MAX_SKIP_TOKENS and dtype == torch.bfloat16 else "triton"


def _cslt_plan_exists(a: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> bool:
    if a.shape[0] <= CSLT_MAX_SKIP_TOKENS or not cslt_supported(a.device, a.dtype):
        return False
    width = w_up.shape[0]
    cols = padded_shape(1, width - width % 4, device_arch(a.device))[1]
    return plan_for(a.device, a.dtype, a.shape[0], cols, -(-w_down.shape[1] // 8) * 8) is not None


@torch.library.custom_op("elas::up_relu2_sparse24", mutates_args=())
def up_relu2_sparse24_op(a: torch.Tensor, w_up: torch.Tensor, two_by_four: bool) -> torch.Tensor:
    """`gemm_relu2_sparse24.up_relu2_sparse24`: a (T, K), w_up (F, K) -> pruned y (T, F)."""
    return up_relu2_sparse24(a, w_up, two_by_four)


@up_relu2_sparse24_op.register_fake
def _(a, w_up, two_by_four):
    return a.new_empty(a.shape[0], w_up.shape[0])


@torch.library.custom_op("elas::relu2_sparse24_ffn", mutates_args=())
def relu2_sparse24_ffn_op(a: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                          two_by_four: bool) -> torch.Tensor:
    """`ffn_fused.relu2_sparse24_ffn`: a (T, K), w_up (F, K), w_down (F, N) -> (T, N)."""
    return relu2_sparse24_ffn(a, w_up, w_down, two_by_four)


@relu2_sparse24_ffn_op.register_fake
def _(a, w_up, w_down, two_by_four):
    return a.new_empty(a.shape[0], w_down.shape[1])


@torch.library.custom_op("elas::sparse24_down", mutates_args=())
def sparse24_down_op(a: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, gemm: str) -> torch.Tensor:
    """sparse24(relu(a @ w_up.T) ** 2) @ w_down through the 2:4 GEMM `sparse24_route` picks."""
    cslt = gemm in ("auto", "cusparselt") and _cslt_plan_exists(a, w_up, w_down)
    route = sparse24_route(a.shape[0], a.dtype, cslt, gemm)
    if route == "gemv":
        return sparse24_gemv(up_relu2_sparse24(a, w_up, True), w_down)
    if route == "cusparselt":
        return sparse24_matmul_cslt(a, w_up, w_down)
    return sparse24_matmul(up_relu2_sparse24_compress(a, w_up), w_down)


@sparse24_down_op.register_fake
def _(a, w_up, w_down, gemm):
    return a.new_empty(a.shape[0], w_down.shape[1])
