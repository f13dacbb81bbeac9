"""The Triton 2:4 sparse-dense GEMM against the reference: the decompressed activation times the
weight, accumulated in float32 (the cuSPARSELt path: test_kernels_sparse24_cslt.py).

CPU tests run the kernel under the Triton interpreter; `gpu` tests run it compiled at ELAS shapes.
Run: python -m pytest tests/test_kernels_sparse24_matmul.py -v
"""

from __future__ import annotations

import pytest
import torch

from elas_serve.kernels.gemm_relu2_sparse24 import up_relu2_sparse24_compress
from elas_serve.kernels.relu2_sparse24 import relu2_sparse24_compress, sparse24_decompress_ref
from elas_serve.kernels.sparse24_matmul import sparse24_matmul, sparse24_matmul_ref
from elas_serve.kernels.triton_utils import interpreting

ELAS = {"350m": (4104, 256), "1b": (8191, 512)}  # width, rank

# the `gpu` tests would take hours under the interpreter: they need compiled kernels
COMPILED = pytest.mark.skipif(interpreting(), reason="run with TRITON_INTERPRET=0 on a GPU")


def _operands(num_tokens: int, width: int, n: int, dtype: torch.dtype, seed: int, device: str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(num_tokens, width, generator=g)
    w = torch.randn(width, n, generator=g) / width ** 0.5
    return h.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)


def _check(got: torch.Tensor, ref32: torch.Tensor, dtype: torch.dtype) -> None:
    """`got` is `ref32` (computed in float32 from the same operands) up to output rounding."""
    assert got.dtype == dtype and got.shape == ref32.shape
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), ref32, rtol=tol, atol=tol * ref32.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_tokens,width,n,splits", [
    (37, 129, 24, None), (5, 131, 40, 2), (64, 258, 130, 3), (3, 3, 8, None), (17, 516, 128, 1)])
def test_matmul_matches_reference(num_tokens, width, n, splits, dtype):
    h, w = _operands(num_tokens, width, n, dtype, seed=width + n)
    a = relu2_sparse24_compress(h)
    ref32 = sparse24_decompress_ref(a).float() @ w.float()
    _check(sparse24_matmul(a, w, splits), ref32, dtype)
    _check(sparse24_matmul(a, w.T.contiguous().T, splits), ref32, dtype)  # column-major weight
    if dtype == torch.float32:  # the reference helper itself, on the same operands
        torch.testing.assert_close(sparse24_matmul(a, w, splits), sparse24_matmul_ref(a, w))


def test_matmul_uses_every_kept_value():
    """Every kept value and tail entry is multiplied with its own weight row: one-hot weights."""
    h, _ = _operands(16, 131, 1, torch.float32, seed=0)
    a = relu2_sparse24_compress(h)
    dense = sparse24_decompress_ref(a)  # (16, 131)
    eye = torch.eye(131)  # w = I: the GEMM returns the decompressed activation itself
    torch.testing.assert_close(sparse24_matmul(a, eye), dense, rtol=0, atol=0)


@pytest.mark.gpu
@COMPILED
@pytest.mark.parametrize("model", list(ELAS))
@pytest.mark.parametrize("num_tokens", [17, 77, 1024])
def test_matmul_gpu_elas_shapes(model, num_tokens):
    width, rank = ELAS[model]
    for dtype in (torch.bfloat16, torch.float32):
        h, w = _operands(num_tokens, width, rank, dtype, seed=1, device="cuda")
        a = relu2_sparse24_compress(h)
        ref32 = sparse24_decompress_ref(a).float() @ w.float()
        _check(sparse24_matmul(a, w), ref32, dtype)
        _check(sparse24_matmul(a, w, splits=1), ref32, dtype)
        x = torch.randn(num_tokens, rank, device="cuda").to(dtype)  # the producer's layout is the same
        a = up_relu2_sparse24_compress(x, w)  # w doubles as an up factor (F, K = rank)
        _check(sparse24_matmul(a, w), sparse24_decompress_ref(a).float() @ w.float(), dtype)
