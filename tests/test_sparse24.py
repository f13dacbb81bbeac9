"""The 2:4 reference: strict top-2 of every 4 by magnitude, ties to the lower index, dense tail.

Run: python -m pytest tests/test_sparse24.py -v
"""

from __future__ import annotations

import pytest
import torch

from elas_serve.kernels.relu2_sparse24 import relu2_sparse24_ref, sparse24_keep_mask


def _brute_force(row: list[float]) -> list[bool]:
    keep = [True] * len(row)
    body = len(row) - len(row) % 4
    for g in range(0, body, 4):
        order = sorted(range(4), key=lambda i: (-abs(row[g + i]), i))
        for i in range(4):
            keep[g + i] = i in order[:2]
    return keep


@pytest.mark.parametrize("width", [4, 8, 13, 129, 130, 131])
def test_mask_matches_brute_force_with_ties(width):
    g = torch.Generator().manual_seed(width)
    y = torch.randint(-3, 4, (37, width), generator=g).float()  # small ints: many ties
    got = sparse24_keep_mask(y)
    expected = torch.tensor([_brute_force(r) for r in y.tolist()])
    assert torch.equal(got, expected)
    body = width - width % 4
    assert got[:, :body].reshape(37, -1, 4).sum(-1).eq(2).all()  # strictly 2 of 4
    assert got[:, body:].all()  # tail dense


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_relu2_sparse24_values(dtype):
    h = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = relu2_sparse24_ref(h)
    dense = torch.relu(h).square()
    assert y.dtype == dtype
    kept = y != 0
    assert torch.equal(y[kept], dense[kept])
    assert kept.reshape(64, -1, 4).sum(-1).le(2).all()
    assert torch.equal(relu2_sparse24_ref(h, two_by_four=False), dense)
