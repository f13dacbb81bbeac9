"""The 2:4 reference: strict top-2 of every 4 by magnitude, ties to the lower index, dense tail.

Run: python -m pytest tests/test_sparse24.py -v
"""

from __future__ import annotations

import pytest
import torch

from elas_serve.kernels.relu2_sparse24 import (
    relu2_sparse24_,
    relu2_sparse24_ref,
    sparse24_,
    sparse24_keep_mask,
    sparse24_ref,
)


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


def _rank_formula(row: list[float]) -> list[bool]:
    """The kernels' `top2_of_4` transcribed per group: b_ij = |v_i| >= |v_j| (false with a NaN)."""
    keep = [True] * len(row)
    for g in range(0, len(row) - len(row) % 4, 4):
        v = [abs(x) for x in row[g:g + 4]]
        b = {(i, j): v[i] >= v[j] for i in range(4) for j in range(i + 1, 4)}
        for j in range(4):  # rank_j: lower i beat j when b_ij, higher i when not b_ji
            rank = sum(b[i, j] for i in range(j)) + sum(not b[j, i] for i in range(j + 1, 4))
            keep[g + j] = rank < 2
    return keep


@pytest.mark.parametrize("width", [4, 12, 130, 2064])
def test_mask_with_many_ties(width):
    """Values in {0, 1} and rows of one repeated value: ties everywhere go to the lower index."""
    g = torch.Generator().manual_seed(width)
    y = torch.cat((torch.randint(0, 2, (300, width), generator=g).float(),
                   torch.full((3, width), 2.0), torch.zeros(2, width), -torch.ones(2, width)))
    y[:50] *= torch.randint(0, 2, (50, width), generator=g).float() * 2 - 1  # -1 and 1 tie in magnitude
    expected = torch.tensor([_brute_force(r) for r in y.tolist()])
    assert torch.equal(sparse24_keep_mask(y), expected)
    assert torch.equal(sparse24_ref(y), torch.where(expected, y, 0.0))
    all_equal = sparse24_keep_mask(torch.ones(1, 8))
    assert all_equal.tolist() == [[True, True, False, False, True, True, False, False]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mask_nan_inf_and_signed_zero_follow_the_rank_formula(dtype):
    g = torch.Generator().manual_seed(1)
    y = torch.randint(-2, 3, (200, 131), generator=g).to(dtype)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0], dtype=dtype)
    pick = torch.randint(0, 5, y.shape, generator=g)
    y = torch.where(torch.rand(y.shape, generator=g) < 0.3, special[pick], y)
    expected = torch.tensor([_rank_formula(r) for r in y.float().tolist()])
    assert torch.equal(sparse24_keep_mask(y), expected)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    ref = sparse24_ref(y)
    assert torch.equal(ref.view(bits), torch.where(expected, y, torch.zeros((), dtype=dtype)).view(bits))
    assert torch.equal(sparse24_(y.clone()).view(bits), ref.view(bits))  # in place, same bits
    assert torch.equal(sparse24_ref(y[:, 1:]).view(bits), sparse24_ref(y[:, 1:].contiguous()).view(bits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("two_by_four", [True, False])
def test_relu2_sparse24_in_place_is_the_reference(dtype, two_by_four):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(33, 2064, generator=g).to(dtype)
    h[0, :8] = float("nan")
    h[1, :5] = torch.tensor([float("inf"), -float("inf"), -0.0, 0.0, 3.0])
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    ref = relu2_sparse24_ref(h, two_by_four)
    dense = torch.relu(h).square()
    assert torch.equal(ref.view(bits), (sparse24_ref(dense) if two_by_four else dense).view(bits))
    got = h.clone()
    assert relu2_sparse24_(got, two_by_four) is got
    assert torch.equal(got.view(bits), ref.view(bits))


def test_references_stay_differentiable():
    """With autograd on, the references' gradient is the mask's (zero where dropped), as before."""
    h = torch.randn(6, 20, generator=torch.Generator().manual_seed(3), requires_grad=True)
    relu2_sparse24_ref(h).sum().backward()
    keep = sparse24_keep_mask(torch.relu(h).square()).detach()
    assert torch.equal(h.grad, torch.where(keep, 2 * torch.relu(h), 0.0).detach())
    y = torch.randn(6, 20, requires_grad=True)
    sparse24_ref(y).sum().backward()
    assert torch.equal(y.grad, sparse24_keep_mask(y).float())
