"""The fused FFN kernel against its reference `sparse24(relu(a @ w_up.T) ** 2) @ w_down`.

2:4 selection is discontinuous where two activations of a group tie, and the kernel accumulates the
up projection in its own order, so the output is compared with the reference computed on the
kernel's own rounded pre-activations (`h_out`), and those with the reference up projection.
Integer-valued operands make exact ties common and the up projection exact.

CPU tests run the kernel under the Triton interpreter; `gpu` tests run it compiled at ELAS shapes.
Run: python -m pytest tests/test_kernels_ffn_fused.py -v
"""

from __future__ import annotations

import pytest
import torch

from elas_serve.kernels.ffn_fused import relu2_sparse24_ffn, relu2_sparse24_ffn_ref
from elas_serve.kernels.relu2_sparse24 import relu2_sparse24_ref
from elas_serve.kernels.triton_utils import interpreting

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
ELAS = {"350m": (1024, 4104, 256), "1b": (2048, 8191, 512)}  # hidden, width, rank

# the `gpu` tests would take hours under the interpreter: they need compiled kernels
COMPILED = pytest.mark.skipif(interpreting(), reason="run with TRITON_INTERPRET=0 on a GPU")


def _operands(t: int, k: int, width: int, n: int, dtype: torch.dtype, seed: int, ties: bool = False,
              device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if ties:  # small integers: exact products and sums, many equal activations in a group
        a, w_up = (torch.randint(-1, 2, s, generator=g).float() for s in ((t, k), (width, k)))
    else:
        a, w_up = torch.randn(t, k, generator=g), torch.randn(width, k, generator=g) / k ** 0.5
    w_down = torch.randn(width, n, generator=g) / width ** 0.5
    return tuple(x.to(device=device, dtype=dtype) for x in (a, w_up, w_down))


def _check_fused(a, w_up, w_down, two_by_four=True, splits=None, w_down_view=None):
    dtype = a.dtype
    h = torch.empty(a.shape[0], w_up.shape[0], dtype=dtype, device=a.device)
    out = relu2_sparse24_ffn(a, w_up, w_down if w_down_view is None else w_down_view, two_by_four,
                             splits, h_out=h)
    assert out.dtype == dtype and out.shape == (a.shape[0], w_down.shape[1])
    tol = TOL[dtype]
    h_ref = (a.float() @ w_up.float().T)
    torch.testing.assert_close(h.float(), h_ref, rtol=tol, atol=tol * h_ref.abs().max().item())
    ref32 = relu2_sparse24_ref(h, two_by_four).float() @ w_down.float()
    torch.testing.assert_close(out.float(), ref32, rtol=tol, atol=tol * ref32.abs().max().item())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("t,k,width,n,splits,ties", [
    (37, 24, 129, 24, None, False), (5, 40, 131, 40, 2, False), (64, 70, 258, 130, 3, False),
    (3, 16, 3, 8, None, False), (20, 32, 130, 48, None, True), (9, 24, 129, 16, 2, True),
    (40, 300, 131, 24, None, False)])  # K > RESIDENT_MAX_K: the input streams with the weights
def test_fused_matches_reference(t, k, width, n, splits, ties, dtype):
    a, w_up, w_down = _operands(t, k, width, n, dtype, seed=width + n, ties=ties)
    out = _check_fused(a, w_up, w_down, splits=splits)
    if dtype == torch.float32 and not ties:  # no near-ties at float32: the plain reference agrees
        torch.testing.assert_close(out, relu2_sparse24_ffn_ref(a, w_up, w_down), rtol=1e-5, atol=1e-5)


def test_fused_without_two_by_four_and_transposed_down():
    a, w_up, w_down = _operands(11, 48, 131, 40, torch.float32, seed=5)
    _check_fused(a, w_up, w_down, two_by_four=False)
    _check_fused(a, w_up, w_down, w_down_view=w_down.T.contiguous().T)  # a dense down's weight.T


def test_fused_selection_matters():
    """The kernel really drops 2 of 4: its output differs from the dense relu² FFN."""
    a, w_up, w_down = _operands(16, 32, 128, 32, torch.float32, seed=9)
    sparse = relu2_sparse24_ffn(a, w_up, w_down, True)
    dense = relu2_sparse24_ffn_ref(a, w_up, w_down, two_by_four=False)
    assert (sparse - dense).abs().max() > 0.1 * dense.abs().max()


@pytest.mark.gpu
@COMPILED
@pytest.mark.parametrize("model", list(ELAS))
@pytest.mark.parametrize("num_tokens", [1, 8, 77, 1024, 8192])
def test_fused_gpu_elas_shapes(model, num_tokens):
    hidden, width, rank = ELAS[model]
    for dtype, k, ties in [(torch.bfloat16, rank, False), (torch.bfloat16, rank, True),
                           (torch.bfloat16, hidden, False), (torch.float32, rank, False)]:
        a, w_up, w_down = _operands(num_tokens, k, width, rank, dtype, seed=3, ties=ties, device="cuda")
        _check_fused(a, w_up, w_down)
        if num_tokens <= 1024:
            _check_fused(a, w_up, w_down, splits=1)
    a, w_up, w_down = _operands(num_tokens, rank, width, hidden, torch.bfloat16, seed=4, device="cuda")
    _check_fused(a, w_up, w_down, w_down_view=w_down.T.contiguous().T)  # a dense down's weight.T
