"""FFN backends: every way of computing the ELAS FFN `down(sparse24(relu(up(x)) ** 2))`.

A projection is passed as its factors `(weight_in, weight_out)`, computing
`x @ weight_in @ weight_out.T`, or `(None, weight)` for a dense `x @ weight.T`. All backends compute
the same function as `dense` (the reference); the model picks one by name (design section 7).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .relu2_sparse24 import relu2_sparse24_ref

Factors = tuple["torch.Tensor | None", torch.Tensor]
FFNFn = Callable[[torch.Tensor, Factors, Factors, bool], torch.Tensor]


def project(x: torch.Tensor, factors: Factors) -> torch.Tensor:
    weight_in, weight_out = factors
    if weight_in is not None:
        x = x @ weight_in
    return x @ weight_out.T


def ffn_dense(x: torch.Tensor, up: Factors, down: Factors, two_by_four: bool) -> torch.Tensor:
    """Reference: PyTorch matmuls with the 2:4 mask applied. x (T, hidden) -> (T, hidden)."""
    return project(relu2_sparse24_ref(project(x, up), two_by_four), down)


FFN_BACKENDS: dict[str, FFNFn] = {"dense": ffn_dense}
