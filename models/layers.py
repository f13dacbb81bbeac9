"""Building blocks of the ELAS decoder: projections, RMSNorm and rotary embeddings.

Parameter names are the checkpoint's (HF LLaMA + the authors' LORO names) so that a state dict
loads by name with no mapping:
- dense projection: `weight` (out, in), computing `x @ weight.T`;
- low-rank (LORO) projection: `weight_in` (in, r) and `weight_out` (out, r), computing
  `x @ weight_in @ weight_out.T` with no nonlinearity between the factors;
- optional `bias` (out,) on either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, slots=True)
class ProjSpec:
    """How one projection is stored: dense (`rank is None`) or LORO low-rank with `rank`."""

    rank: int | None = None
    bias: bool = False

    def __post_init__(self) -> None:
        if self.rank is not None and self.rank <= 0:
            raise ValueError(f"rank must be positive, got {self.rank}")


class Projection(nn.Module):
    """A linear map `in_features -> out_features`, dense or LORO low-rank."""

    def __init__(self, in_features: int, out_features: int, spec: ProjSpec = ProjSpec()):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        if spec.rank is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features))
        else:
            self.weight_in = nn.Parameter(torch.empty(in_features, spec.rank))
            self.weight_out = nn.Parameter(torch.empty(out_features, spec.rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if spec.bias else None

    def factors(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`(weight_in, weight_out)`, or `(None, weight)` when dense (kernels' convention)."""
        assert self.bias is None, "kernel backends take bias-free projections"
        return (None, self.weight) if self.spec.rank is None else (self.weight_in, self.weight_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.spec.rank is None:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x @ self.weight_in, self.weight_out, self.bias)

    def extra_repr(self) -> str:
        kind = "dense" if self.spec.rank is None else f"low-rank r={self.spec.rank}"
        return f"{self.in_features} -> {self.out_features}, {kind}, bias={self.spec.bias}"


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: statistics in float32, result cast back before the weight (as HF does)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE (HF LLaMA convention): cos/sin at explicit integer positions.

    NOTE: angles are computed in float32 from the positions on every forward (once per model
    step, shared by all layers) rather than read from a table, so any position works.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        return 1.0 / (self.theta ** (exponent / self.head_dim))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # (..., D/2)
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(-2)  # (..., 1, D)
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., heads, D) rotated in float32, returned in x's dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
