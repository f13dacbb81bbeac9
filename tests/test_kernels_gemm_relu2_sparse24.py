"""The up GEMM with relu ** 2 + 2:4 in its epilogue, in each of its output layouts, against the
references: the pruned activation, the `Sparse24` layout, and cuSPARSELt's layout model.

The kernel accumulates the GEMM in its own order, so the selection is compared, bit for bit, with
the reference applied to the kernel's own rounded pre-activations (`h_out`), and those with the
reference GEMM up to rounding; integer-valued operands make exact ties common and the GEMM exact.

CPU tests run the kernel under the Triton interpreter; `gpu` tests run it compiled at ELAS shapes.
Run: python -m pytest tests/test_kernels_gemm_relu2_sparse24.py -v
"""

from __future__ import annotations

import pytest
import torch

from elas_serve.kernels.cslt_layout import cslt_compress_ref, padded_shape
from elas_serve.kernels.gemm_relu2_sparse24 import (
    up_relu2_sparse24,
    up_relu2_sparse24_compress,
    up_relu2_sparse24_cslt,
    up_relu2_sparse24_ref,
)
from elas_serve.kernels.relu2_sparse24 import relu2_sparse24_ref, sparse24_compress_ref
from elas_serve.kernels.triton_utils import interpreting

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
ELAS = {"350m": (1024, 4104, 256), "1b": (2048, 8191, 512)}  # hidden, width, rank

# the `gpu` tests would take hours under the interpreter: they need compiled kernels
COMPILED = pytest.mark.skipif(interpreting(), reason="run with TRITON_INTERPRET=0 on a GPU")


def _operands(t: int, k: int, width: int, dtype: torch.dtype, seed: int, ties: bool = False,
              device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if ties:  # small integers: exact products and sums, many equal activations in a group
        a, w = (torch.randint(-1, 2, s, generator=g).float() for s in ((t, k), (width, k)))
    else:
        a, w = torch.randn(t, k, generator=g), torch.randn(width, k, generator=g) / k ** 0.5
    return a.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)


def _own_h(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The kernel's rounded pre-activations, checked against the reference GEMM."""
    h = torch.empty(a.shape[0], w.shape[0], dtype=a.dtype, device=a.device)
    up_relu2_sparse24(a, w, True, h_out=h)
    ref = a.float() @ w.float().T
    tol = TOL[a.dtype]
    torch.testing.assert_close(h.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    return h


def _pruned_body(h: torch.Tensor, arch: int) -> torch.Tensor:
    width = h.shape[1]
    body = width - width % 4
    rows, cols = padded_shape(h.shape[0], body, arch)
    y = torch.zeros(rows, cols, dtype=h.dtype, device=h.device)
    y[:h.shape[0], :body] = relu2_sparse24_ref(h)[:, :body]
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("t,k,width,ties", [(5, 24, 131, False), (37, 40, 258, False), (70, 16, 64, False),
                                            (20, 32, 130, True), (3, 16, 3, False)])
def test_pruned_and_sparse24_outputs(t, k, width, ties, dtype):
    a, w = _operands(t, k, width, dtype, seed=width + t, ties=ties)
    h = _own_h(a, w)
    for two_by_four in (True, False):
        y = up_relu2_sparse24(a, w, two_by_four)
        assert y.dtype == dtype and y.shape == (t, width)
        assert torch.equal(y, relu2_sparse24_ref(h, two_by_four))
    got, ref = up_relu2_sparse24_compress(a, w), sparse24_compress_ref(torch.relu(h).square())
    for name, x, r in zip(("values", "meta", "tail"), got, ref):
        assert x.dtype == r.dtype and x.shape == r.shape and torch.equal(x, r), name
    if dtype == torch.float32 and not ties:  # no near-ties at float32: the plain reference agrees
        torch.testing.assert_close(up_relu2_sparse24(a, w, True), up_relu2_sparse24_ref(a, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("t,k,width", [(5, 24, 131), (70, 32, 258), (130, 16, 200)])
def test_cslt_output_matches_the_layout_model(arch, t, k, width):
    a, w = _operands(t, k, width, torch.bfloat16, seed=t + width)
    h = _own_h(a, w)
    buf, tail = up_relu2_sparse24_cslt(a, w, arch)
    ref = cslt_compress_ref(_pruned_body(h, arch), arch)
    assert buf.dtype == ref.dtype and buf.shape == ref.shape
    assert torch.equal(buf.view(torch.int16), ref.view(torch.int16))
    assert torch.equal(tail, relu2_sparse24_ref(h)[:, width - width % 4:])


def test_cslt_output_refuses_float32():
    a, w = _operands(4, 16, 64, torch.float32, seed=0)
    with pytest.raises(ValueError, match="16-bit"):
        up_relu2_sparse24_cslt(a, w, 90)


@pytest.mark.gpu
@COMPILED
@pytest.mark.parametrize("model", list(ELAS))
@pytest.mark.parametrize("num_tokens", [1, 8, 77, 1024])
def test_gpu_elas_shapes(model, num_tokens):
    hidden, width, rank = ELAS[model]
    arch = 90 if torch.cuda.get_device_capability()[0] >= 9 else 80
    for k in (rank, hidden):
        a, w = _operands(num_tokens, k, width, torch.bfloat16, seed=k, device="cuda")
        h = _own_h(a, w)
        assert torch.equal(up_relu2_sparse24(a, w, True), relu2_sparse24_ref(h))
        got, ref = up_relu2_sparse24_compress(a, w), sparse24_compress_ref(torch.relu(h).square())
        assert all(torch.equal(x, r) for x, r in zip(got, ref))
        buf, _ = up_relu2_sparse24_cslt(a, w, arch)
        assert torch.equal(buf.view(torch.int16), cslt_compress_ref(_pruned_body(h, arch), arch).view(torch.int16))
