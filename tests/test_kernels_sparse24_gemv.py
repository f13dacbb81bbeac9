"""Decode's row-skipping GEMV (pruned y (T, F) @ w (F, N), T <= 16) and the split-K reduction
kernel it shares with the fused FFN and the 2:4 GEMM, against their references.

That the GEMV reads only the rows some token keeps is checked by behaviour: the rows every token
drops are filled with NaN, which any read would carry into the output (NaN * 0 = NaN).

CPU tests run the kernels under the Triton interpreter; `gpu` tests run them compiled at ELAS shapes.
Run: python -m pytest tests/test_kernels_sparse24_gemv.py -v
"""

from __future__ import annotations

import pytest
import torch

from elas_serve.kernels.relu2_sparse24 import relu2_sparse24_ref
from elas_serve.kernels.sparse24_gemv import GEMV_MAX_TOKENS, sparse24_gemv, sparse24_gemv_ref
from elas_serve.kernels.split_reduce import sum_splits, sum_splits_ref
from elas_serve.kernels.triton_utils import interpreting

ELAS = {"350m": (4104, 256), "1b": (8191, 512)}  # width, rank
COMPILED = pytest.mark.skipif(interpreting(), reason="run with TRITON_INTERPRET=0 on a GPU")


def _operands(num_tokens: int, width: int, n: int, dtype: torch.dtype, seed: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    y = relu2_sparse24_ref(torch.randn(num_tokens, width, generator=g))  # relu's zeros and 2:4's
    w = torch.randn(width, n, generator=g) / width ** 0.5
    return y.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)


def _check(got: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> None:
    ref = y.float() @ torch.nan_to_num(w.float())
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[y.dtype]
    assert got.dtype == y.dtype and got.shape == ref.shape
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_tokens,width,n,splits", [(1, 131, 24, None), (3, 258, 40, 2), (16, 200, 130, 3),
                                                       (5, 64, 16, 1)])
def test_gemv_matches_reference(num_tokens, width, n, splits, dtype):
    y, w = _operands(num_tokens, width, n, dtype, seed=width + n)
    _check(sparse24_gemv(y, w, splits), y, w)
    _check(sparse24_gemv(y, w.T.contiguous().T, splits), y, w)  # a dense down's weight.T
    if dtype == torch.float32:
        torch.testing.assert_close(sparse24_gemv(y, w, splits), sparse24_gemv_ref(y, w))


@pytest.mark.parametrize("num_tokens", [1, 4])
def test_gemv_reads_only_kept_rows(num_tokens):
    y, w = _operands(num_tokens, 259, 48, torch.float32, seed=num_tokens)
    dropped = (y == 0).all(0)  # (F,) rows no token keeps
    assert dropped.float().mean() > (0.5 if num_tokens == 1 else 0.0)  # at one token: 2:4 and relu's zeros
    w[dropped] = float("nan")
    out = sparse24_gemv(y, w, splits=2)
    assert not out.isnan().any()
    _check(out, y, w)


def test_gemv_propagates_nan_activations():
    y, w = _operands(2, 64, 16, torch.float32, seed=1)
    y[1, 3] = float("nan")
    out = sparse24_gemv(y, w)
    assert out[1].isnan().all() and not out[0].isnan().any()


def test_gemv_refuses_too_many_tokens():
    y, w = _operands(GEMV_MAX_TOKENS + 1, 64, 16, torch.float32, seed=0)
    with pytest.raises(AssertionError, match="at most"):
        sparse24_gemv(y, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sum_splits_matches_reference(dtype):
    p = torch.randn(5, 7, 300, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sum_splits(p, dtype), sum_splits_ref(p, dtype))


@pytest.mark.gpu
@COMPILED
@pytest.mark.parametrize("model", list(ELAS))
@pytest.mark.parametrize("num_tokens", [1, 2, 8, 16])
def test_gemv_gpu_elas_shapes(model, num_tokens):
    width, rank = ELAS[model]
    y, w = _operands(num_tokens, width, rank, torch.bfloat16, seed=2, device="cuda")
    _check(sparse24_gemv(y, w), y, w)
    _check(sparse24_gemv(y, w, splits=1), y, w)
    w[(y == 0).all(0)] = float("nan")
    assert not sparse24_gemv(y, w).isnan().any()
