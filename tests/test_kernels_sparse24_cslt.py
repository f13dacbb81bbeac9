"""cuSPARSELt: the layout model (`cslt_layout.py`) and the path that feeds `_cslt_sparse_mm` with it
(`sparse24_cslt.py`: plans, padded weights, CUDA-graph safety).

CPU tests check the model itself (a bijection that round-trips, hand-checked positions) and the
path's pure parts (weight padding and its refresh, bucketing, torch-version keyword arguments);
`gpu` tests check the model bit for bit against `torch._cslt_compress`, the producer through
`_cslt_sparse_mm`, plan search and validation (PyTorch issue 155333), and capture/replay.
Run: python -m pytest tests/test_kernels_sparse24_cslt.py -v
"""

from __future__ import annotations

import gc
import logging

import pytest
import torch

from elas_serve.kernels import sparse24_cslt as cslt
from elas_serve.kernels.cslt_layout import cslt_compress_ref, cslt_decompress_ref, nibble_index, padded_shape
from elas_serve.kernels.gemm_relu2_sparse24 import up_relu2_sparse24, up_relu2_sparse24_cslt
from elas_serve.kernels.relu2_sparse24 import relu2_sparse24_pruned, relu2_sparse24_ref, sparse24_ref
from elas_serve.kernels.triton_utils import interpreting

ELAS = {"350m": (4104, 256), "1b": (8191, 512)}  # width, rank
COMPILED = pytest.mark.skipif(interpreting(), reason="run with TRITON_INTERPRET=0 on a GPU")


def _pruned(rows: int, cols: int, seed: int, zeros: bool = True, device: str = "cpu") -> torch.Tensor:
    """A 2:4 matrix; without `zeros`, every group keeps 2 distinct non-zeros (no choice of zero)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, cols, generator=g) if zeros else torch.rand(rows, cols, generator=g) + 0.5
    return sparse24_ref(torch.relu(h).square().to(torch.bfloat16)).to(device)


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("rows,cols", [(128, 128), (256, 384), (128, 256)])
def test_layout_model_round_trips(arch, rows, cols):
    y = _pruned(rows, cols, seed=rows + cols)
    buf = cslt_compress_ref(y, arch)  # asserts the nibble index is a bijection
    assert buf.shape == (rows, 9 * cols // 16) and buf.dtype == y.dtype
    assert torch.equal(cslt_decompress_ref(buf, rows, cols, arch), y)
    dense_rows = _pruned(rows, cols, seed=1, zeros=False)  # 2 non-zeros per group: values are them
    values = cslt_compress_ref(dense_rows, arch).flatten()[:rows * cols // 2]
    assert torch.equal(values, dense_rows[dense_rows != 0])


def test_layout_model_positions_sm90():
    """One 16-bit word holds groups k and k + 4 of rows r and r + 8 (of a 16-row block)."""
    rows, cols = 128, 128
    m, c = torch.tensor([0, 8, 0, 8, 1, 16, 64]), torch.tensor([0, 0, 16, 16, 0, 0, 0])
    assert nibble_index(m, c, rows, cols, 90).tolist() == [0, 1, 2, 3, 16, 128, 16 * cols]
    assert nibble_index(torch.tensor([0]), torch.tensor([32]), rows, cols, 90).tolist() == [512]


def test_layout_model_positions_sm80():
    """One 16-bit word holds 16 columns of one row; 32x32 tiles column-major in 128x64 blocks."""
    rows, cols = 256, 128
    m, c = torch.tensor([0, 0, 8, 0, 1, 16, 32, 0, 128]), torch.tensor([0, 4, 0, 16, 0, 0, 0, 32, 0])
    words = [0, 0, 1, 2, 8, 4, 64, 256, 512]
    assert nibble_index(m, c, rows, cols, 80).tolist() == [4 * w + (ci % 16) // 4 for w, ci in zip(words, c.tolist())]


def test_layout_model_rejects_unpadded_shapes():
    with pytest.raises(ValueError, match="rows % 64"):
        cslt_compress_ref(_pruned(100, 64, seed=0), 90)
    assert padded_shape(1, 4104, 90) == (64, 4160) and padded_shape(200, 8188, 80) == (256, 8192)


def test_padded_weight_is_cached_and_refreshed_in_place():
    w = torch.randn(10, 6)
    p1 = cslt.padded_weight(w, 16, 8, col_major=True)
    assert p1.shape == (16, 8) and p1.stride() == (1, 16) and torch.equal(p1[:10, :6], w) and not p1[10:].any()
    assert cslt.padded_weight(w, 16, 8, col_major=True) is p1
    ptr = p1.data_ptr()
    w.mul_(2)  # an in-place change: the same buffer, refreshed (a captured graph may read it)
    p2 = cslt.padded_weight(w, 16, 8, col_major=True)
    assert p2.data_ptr() == ptr and torch.equal(p2[:10, :6], w)
    assert cslt.padded_weight(w, 16, 8, col_major=False).is_contiguous()
    key = id(w)
    del w, p1, p2
    gc.collect()
    assert key not in cslt._WEIGHTS  # dropped with the weight


def test_buckets_and_split_k_arguments():
    assert [cslt.bucket(t) for t in (1, 64, 65, 1000, 16384)] == [64, 64, 128, 1024, 16384]
    names = {a.name for a in torch.ops.aten._cslt_sparse_mm.default._schema.arguments}
    assert cslt._mm_kwargs(1) == {}
    kwargs = cslt._mm_kwargs(2)
    assert kwargs["split_k"] == 2 and set(kwargs) <= names


# ---- GPU ------------------------------------------------------------------------------------------

def _arch() -> int:
    return cslt.device_arch(torch.device("cuda"))


def _need_cslt():
    if not cslt.cslt_supported(torch.device("cuda"), torch.bfloat16):
        pytest.skip("no cuSPARSELt for this device / torch build")


@pytest.mark.gpu
@COMPILED
@pytest.mark.parametrize("model", list(ELAS))
@pytest.mark.parametrize("num_tokens", [64, 1024])
def test_gpu_layout_model_bit_for_bit(model, num_tokens):
    _need_cslt()
    width, _ = ELAS[model]
    rows, cols = padded_shape(num_tokens, width - width % 4, _arch())
    y = _pruned(rows, cols, seed=3, zeros=False, device="cuda")
    theirs = torch._cslt_compress(y)
    assert torch.equal(theirs.flatten().view(torch.int16), cslt_compress_ref(y, _arch()).flatten().view(torch.int16))
    y = _pruned(rows, cols, seed=4, zeros=True, device="cuda")  # relu's zeros: positions may differ
    assert torch.equal(cslt_decompress_ref(torch._cslt_compress(y), rows, cols, _arch()), y)


@pytest.mark.gpu
@COMPILED
@pytest.mark.parametrize("model", list(ELAS))
def test_gpu_producer_multiplies_like_cslt_compress(model):
    _need_cslt()
    width, rank = ELAS[model]
    g = torch.Generator(device="cuda").manual_seed(5)
    a = torch.randn(300, rank, generator=g, device="cuda").bfloat16()
    w_up = (torch.randn(width, rank, generator=g, device="cuda") / rank ** 0.5).bfloat16()
    h = torch.empty(300, width, dtype=torch.bfloat16, device="cuda")
    up_relu2_sparse24(a, w_up, True, h_out=h)
    buf, _ = up_relu2_sparse24_cslt(a, w_up, _arch())
    rows, cols = padded_shape(300, width - width % 4, _arch())
    pruned, _ = relu2_sparse24_pruned(h, rows, cols)
    w = torch.randn(cols, 256, generator=g, device="cuda").bfloat16()
    assert torch.equal(torch._cslt_sparse_mm(buf, w), torch._cslt_sparse_mm(torch._cslt_compress(pruned), w))
    assert torch.equal(cslt_decompress_ref(buf, rows, cols, _arch()), pruned)
    assert cslt.layout_ok(torch.device("cuda"), torch.bfloat16)


@pytest.mark.gpu
@COMPILED
@pytest.mark.parametrize("model", list(ELAS))
@pytest.mark.parametrize("num_tokens", [77, 1024, 4096])
def test_gpu_planned_matmul_matches_reference(model, num_tokens):
    _need_cslt()
    width, rank = ELAS[model]
    g = torch.Generator(device="cuda").manual_seed(6)
    a = torch.randn(num_tokens, rank, generator=g, device="cuda").bfloat16()
    w_up = (torch.randn(width, rank, generator=g, device="cuda") / rank ** 0.5).bfloat16()
    w = (torch.randn(width, rank, generator=g, device="cuda") / width ** 0.5).bfloat16()
    h = torch.empty(num_tokens, width, dtype=torch.bfloat16, device="cuda")
    up_relu2_sparse24(a, w_up, True, h_out=h)
    ref = relu2_sparse24_ref(h).float() @ w.float()
    for _ in range(10):  # PyTorch issue 155333: wrong results can be intermittent
        got = cslt.sparse24_matmul_cslt(a, w_up, w).float()
        assert ((got - ref).norm() / ref.norm()).item() < 2e-2
    for view in (w, w.T.contiguous().T):
        assert ((cslt.sparse24_matmul_cslt(a, w_up, view).float() - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.gpu
@COMPILED
def test_gpu_prepared_plans_capture_and_replay(caplog):
    _need_cslt()
    width, rank = ELAS["350m"]
    g = torch.Generator(device="cuda").manual_seed(7)
    w_up = (torch.randn(width, rank, generator=g, device="cuda") / rank ** 0.5).bfloat16()
    w = (torch.randn(width, rank, generator=g, device="cuda") / width ** 0.5).bfloat16()
    plans = cslt.prepare(w, width, 2048)
    assert set(plans) == {64, 128, 256, 512, 1024, 2048} and any(p is not None for p in plans.values())
    num_tokens = next(b for b, p in plans.items() if p is not None)
    a = torch.randn(num_tokens, rank, generator=g, device="cuda").bfloat16()
    eager = cslt.sparse24_matmul_cslt(a, w_up, w)
    copies = sum(len(c) for c in cslt._WEIGHTS.values())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cslt.sparse24_matmul_cslt(a, w_up, w)
    assert sum(len(c) for c in cslt._WEIGHTS.values()) == copies  # nothing padded during capture
    a.copy_(torch.randn(num_tokens, rank, generator=g, device="cuda").bfloat16())
    graph.replay()
    assert torch.equal(out, cslt.sparse24_matmul_cslt(a, w_up, w))
    assert not torch.equal(out, eager)
    # an unprepared bucket met in a capture: recorded as "no plan", with a warning, never probed
    key = (torch.cuda.current_device(), torch.bfloat16, 32768, 4160, 256)
    cslt._PLANS.pop(key, None)
    with caplog.at_level(logging.WARNING), torch.cuda.graph(torch.cuda.CUDAGraph()):
        assert cslt.plan_for(torch.device("cuda"), torch.bfloat16, 20000, 4160, 256) is None
    assert key in cslt._PLANS and cslt._PLANS[key] is None and "no plan" in caplog.text
