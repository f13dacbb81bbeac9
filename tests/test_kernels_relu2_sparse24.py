"""The fused squared-ReLU + 2:4 compression kernel against its PyTorch reference, bit for bit, and
the `Sparse24` layout itself (values, int16 nibble words, dense tail).

CPU tests run the kernel under the Triton interpreter; `gpu` tests run it compiled at ELAS widths.
Run: python -m pytest tests/test_kernels_relu2_sparse24.py -v
"""

from __future__ import annotations

import pytest
import torch

from elas_serve.kernels.relu2_sparse24 import (
    Sparse24,
    relu2_sparse24_compress,
    relu2_sparse24_pruned,
    relu2_sparse24_ref,
    sparse24_compress_ref,
    sparse24_decompress_ref,
    sparse24_ref,
)
from elas_serve.kernels.triton_utils import interpreting

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# the `gpu` tests would take hours under the interpreter: they need compiled kernels
COMPILED = pytest.mark.skipif(interpreting(), reason="run with TRITON_INTERPRET=0 on a GPU")


def _pre_activation(num_tokens: int, width: int, dtype: torch.dtype, seed: int, ties: bool = False,
                    device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-3, 4, (num_tokens, width), generator=g).float() if ties else torch.randn(
        num_tokens, width, generator=g)
    return h.to(device=device, dtype=dtype)


def _assert_same(got: Sparse24, ref: Sparse24) -> None:
    for name, a, b in zip(Sparse24._fields, got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a, b), name


def test_layout_of_a_known_row():
    """Groups with kept pairs (0,1) (0,2) (1,2) (0,3) (1,3) (2,3) and a 2-wide dense tail."""
    y = torch.tensor([[5., 4, 0, 0, 5, 0, 4, 0, 0, 5, 4, 0, 5, 0, 0, 4, 0, 5, 0, 4, 0, 0, 5, 4, 7, 8]])
    a = sparse24_compress_ref(y)
    assert torch.equal(a.values, torch.tensor([[5., 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4]]))
    # nibbles 0x4 0x8 0x9 0xC | 0xD 0xE (then two zero nibbles): low nibble = lowest group
    assert a.meta.dtype == torch.int16 and a.meta.shape == (1, 2)
    assert [w & 0xFFFF for w in a.meta[0].tolist()] == [0xC984, 0x00ED]
    assert torch.equal(a.tail, torch.tensor([[7., 8]]))
    assert a.width == 26
    assert torch.equal(sparse24_decompress_ref(a), y)  # y already keeps exactly 2 of every 4


@pytest.mark.parametrize("width", [4, 7, 129, 131, 258])
def test_compress_reference_round_trip(width):
    y = relu2_sparse24_ref(_pre_activation(9, width, torch.float32, seed=width), two_by_four=False)
    a = sparse24_compress_ref(y)
    assert a.values.shape == (9, width // 4 * 2) and a.tail.shape == (9, width % 4)
    assert torch.equal(sparse24_decompress_ref(a), sparse24_ref(y))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width,ties", [(129, False), (131, False), (258, False), (3, False),
                                        (130, True), (516, True)])
def test_kernel_matches_reference_bit_for_bit(width, ties, dtype):
    h = _pre_activation(37, width, dtype, seed=width, ties=ties)
    got = relu2_sparse24_compress(h)
    _assert_same(got, sparse24_compress_ref(torch.relu(h).square()))
    assert torch.equal(sparse24_decompress_ref(got), relu2_sparse24_ref(h))


def test_kernel_reads_strided_input():
    h = _pre_activation(21, 2 * 131, torch.bfloat16, seed=3)[:, ::2]  # (21, 131), stride (262, 2)
    _assert_same(relu2_sparse24_compress(h), sparse24_compress_ref(torch.relu(h).square()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [129, 258, 2])
def test_pruned_padded_output(width, dtype):
    h = _pre_activation(19, width, dtype, seed=7 + width)
    body = width - width % 4
    rows, cols = 32, (body + 63) // 64 * 64
    out, tail = relu2_sparse24_pruned(h, rows, cols)
    ref = relu2_sparse24_ref(h)
    assert out.shape == (rows, cols) and torch.equal(out[:19, :body], ref[:, :body])
    assert not out[19:].any() and not out[:, body:].any()
    assert torch.equal(tail, ref[:, body:])


@pytest.mark.gpu
@COMPILED
@pytest.mark.parametrize("width", [2064, 3072, 4104, 8191])
@pytest.mark.parametrize("num_tokens", [1, 77, 1024])
def test_kernel_gpu_elas_widths(width, num_tokens):
    for dtype, ties in [(torch.bfloat16, False), (torch.float16, True), (torch.float32, False)]:
        h = _pre_activation(num_tokens, width, dtype, seed=width, ties=ties, device="cuda")
        _assert_same(relu2_sparse24_compress(h), sparse24_compress_ref(torch.relu(h).square()))
        out, tail = relu2_sparse24_pruned(h, (num_tokens + 31) // 32 * 32, (width // 4 * 4 + 63) // 64 * 64)
        ref = relu2_sparse24_ref(h)
        assert torch.equal(out[:num_tokens, :width // 4 * 4], ref[:, :width // 4 * 4])
        assert torch.equal(tail, ref[:, width // 4 * 4:])
