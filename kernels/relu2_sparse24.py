"""Squared ReLU followed by 2:4 activation sparsity: the PyTorch reference.

Semantics (design section 3, "naive" method): `y = relu(h) ** 2`; in every group of 4 consecutive
features keep exactly the 2 of largest magnitude, ties going to the lower index; when the width is
not a multiple of 4, the last `width % 4` features stay dense. This file is the CPU path of the
`dense` FFN backend and the oracle every fused kernel is tested against.

NOTE: with 4 values, "rank < 2" needs only the 6 pairwise comparisons b_ij = (|v_i| >= |v_j|) for
i < j (ties go to the lower index i); the same branch-free formula is what a kernel computes.
"""

from __future__ import annotations

import torch


def sparse24_keep_mask(y: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the kept features of `y` (..., F): 2 of every 4, dense tail kept."""
    width = y.shape[-1]
    body = width - width % 4
    a = y[..., :body].abs().unflatten(-1, (body // 4, 4))  # (..., G, 4)
    v0, v1, v2, v3 = a.unbind(-1)
    b01, b02, b03 = v0 >= v1, v0 >= v2, v0 >= v3
    b12, b13, b23 = v1 >= v2, v1 >= v3, v2 >= v3
    # rank_j = number of entries that beat entry j
    r0 = (~b01).int() + (~b02).int() + (~b03).int()
    r1 = b01.int() + (~b12).int() + (~b13).int()
    r2 = b02.int() + b12.int() + (~b23).int()
    r3 = b03.int() + b13.int() + b23.int()
    keep = (torch.stack((r0, r1, r2, r3), dim=-1) < 2).flatten(-2)  # (..., body)
    if body == width:
        return keep
    tail = torch.ones(*y.shape[:-1], width - body, dtype=torch.bool, device=y.device)
    return torch.cat((keep, tail), dim=-1)


def sparse24_ref(y: torch.Tensor) -> torch.Tensor:
    """`y` with the 2 smallest-magnitude entries of every group of 4 set to zero."""
    return torch.where(sparse24_keep_mask(y), y, torch.zeros((), dtype=y.dtype, device=y.device))


def relu2_sparse24_ref(h: torch.Tensor, two_by_four: bool = True) -> torch.Tensor:
    """`sparse24(relu(h) ** 2)` (or just `relu(h) ** 2`), in the dtype of `h`."""
    y = torch.relu(h).square()
    return sparse24_ref(y) if two_by_four else y
