"""Feed-forward blocks: the ELAS FFN (squared ReLU + 2:4) and the SwiGLU baseline.

ELAS: `down(sparse24(relu(up(x)) ** 2))`, no gate; `sparse24` is applied only when the checkpoint
says `activation_2by4` (and `two_by_four` can be switched off for a dense warm-up in training).
In training the mask passes gradients straight through (as in the authors' STE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from elas_serve.kernels.ffn import FFN_BACKENDS
from elas_serve.kernels.relu2_sparse24 import relu2_sparse24_, sparse24_ref

from .config import ElasConfig
from .layers import Projection, ProjSpec


class _Sparse24STE(torch.autograd.Function):
    """Forward: keep 2 of every 4; backward: identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return sparse24_ref(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class ElasMLP(nn.Module):
    def __init__(self, config: ElasConfig, specs: dict[str, ProjSpec]):
        super().__init__()
        width = config.ffn_width
        self.up_proj = Projection(config.hidden_size, width, specs["up_proj"])
        self.down_proj = Projection(width, config.hidden_size, specs["down_proj"])
        self.two_by_four = config.activation_2by4
        # (max tokens, backend name in FFN_BACKENDS) rows: a call with T tokens takes the first row
        # with T <= max tokens (else the last); "dense" is the autograd-able path
        self.ffn_table: tuple[tuple[float, str], ...] = ((float("inf"), "dense"),)

    def _backend(self, num_tokens: int) -> str:
        return next((name for n, name in self.ffn_table if num_tokens <= n), self.ffn_table[-1][1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = self._backend(x.numel() // x.shape[-1])
        # NOTE: `dense` on CUDA is the epilogue-fused chain (kernels.ffn.ffn_dense) when bias-free
        kernel = backend != "dense" or (x.is_cuda and self.up_proj.bias is None and self.down_proj.bias is None)
        if kernel and not torch.is_grad_enabled():
            fn = FFN_BACKENDS[backend]
            return fn(x, self.up_proj.factors(), self.down_proj.factors(), self.two_by_four)
        h = self.up_proj(x)  # (..., F)
        if not h.requires_grad:
            # NOTE: h is this call's own temporary: relu, square and the 2:4 mask run in place (the
            # same values bit for bit), sparing three (..., F) allocations per layer
            return self.down_proj(relu2_sparse24_(h, self.two_by_four))
        y = torch.relu(h).square()
        return self.down_proj(_Sparse24STE.apply(y) if self.two_by_four else y)


class SwiGLUMLP(nn.Module):
    def __init__(self, config: ElasConfig, specs: dict[str, ProjSpec]):
        super().__init__()
        h, width = config.hidden_size, config.ffn_width
        self.gate_proj = Projection(h, width, specs["gate_proj"])
        self.up_proj = Projection(h, width, specs["up_proj"])
        self.down_proj = Projection(width, h, specs["down_proj"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)  # (..., F)
        if gate.requires_grad:
            return self.down_proj(F.silu(gate) * self.up_proj(x))
        # NOTE: gate is this call's own temporary: silu and the product in place (same values)
        return self.down_proj(F.silu(gate, inplace=True).mul_(self.up_proj(x)))
