"""`--ffn-backend auto` (kernels/ffn_tuning.py): the token buckets, the routing table built from
measurements (never a backend slower than `dense` at a measured bucket), and how the model follows
a table. Which backend wins is a measurement made at start-up on the serving device (and reported
by benchmarks/bench_ffn.py); the `gpu` test measures one and checks the table against its own timings.
Run: python -m pytest tests/test_ffn_tuning.py -v
"""

from __future__ import annotations

import pytest
import torch

from elas_serve.kernels import ffn as ffn_module
from elas_serve.kernels.ffn_tuning import build_table, choose, describe, token_buckets, tune_ffn_backends
from elas_serve.kernels.triton_utils import interpreting
from elas_serve.models import load_model

from authors_ckpt import Variant, write_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tune_ckpt")
    write_checkpoint(path, Variant("tune", layers=2))
    return load_model(path)


def test_buckets_are_powers_of_two_then_the_budget():
    assert token_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert token_buckets(16) == [1, 2, 4, 8, 16] and token_buckets(1) == [1]


def test_table_never_picks_a_backend_slower_than_dense():
    rows = [(1, {"dense": 10.0, "fused": 9.9}),  # within the margin: dense stays
            (2, {"dense": 10.0, "fused": 5.0}), (4, {"dense": 10.0, "fused": 6.0, "sparse24": 4.0}),
            (8, {"dense": 10.0, "sparse24": 12.0}), (16, {"sparse24": 3.0}),  # dense failed there
            (20, {})]
    table = build_table(rows, margin=0.02)
    assert table == [(1, "dense"), (2, "fused"), (4, "sparse24"), (8, "dense"), (16, "sparse24"), (20, "dense")]
    for (_, timings), (_, name) in zip(rows, table):
        if "dense" in timings:
            assert timings[name] <= timings["dense"]
    assert build_table([(1, {"dense": 1.0}), (4, {"dense": 1.0, "fused": 2.0})]) == [(4, "dense")]  # merged
    assert choose({"dense": 1.0, "fused": 0.5}, margin=0.6) == "dense"


def test_cpu_tuning_is_dense_without_measuring(model):
    mlp = model.model.layers[0].mlp
    table = tune_ffn_backends(mlp.up_proj.factors(), mlp.down_proj.factors(), mlp.two_by_four, 20)
    assert table == [(20, "dense")]
    assert describe([(20, "dense")]) == "dense"
    assert describe([(4, "fused"), (20, "dense")]) == "auto(fused<=4,dense<=20)"


def test_model_routes_by_token_count(model, monkeypatch):
    calls = []
    fused = ffn_module.FFN_BACKENDS["fused"]
    monkeypatch.setitem(ffn_module.FFN_BACKENDS, "fused", lambda *a: calls.append(a[0].shape[0]) or fused(*a))
    ids = torch.randint(0, 320, (9,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.set_ffn_backend("dense")
        ref = model.compute_logits(model(ids, torch.arange(9)))
        model.set_ffn_backend([(4, "fused"), (1 << 30, "dense")])
        calls.clear()
        short = model.compute_logits(model(ids[:3], torch.arange(3)))
        long = model.compute_logits(model(ids, torch.arange(9)))
    assert calls == [3, 3]  # the short call went through fused in both layers, the long one did not
    torch.testing.assert_close(short, ref[:3], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(long, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown FFN backend"):
        model.set_ffn_backend([(4, "magic")])
    model.set_ffn_backend("dense")


@pytest.mark.gpu
@pytest.mark.skipif(interpreting(), reason="run with TRITON_INTERPRET=0 on a GPU")
def test_gpu_tuning_at_350m_shapes():
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden, width, rank = 1024, 4104, 256

    def w(*shape):
        return (torch.randn(*shape, generator=g, device="cuda") / shape[0] ** 0.5).bfloat16()

    up, down = (w(hidden, rank), w(width, rank)), (w(width, rank), w(hidden, rank))
    rows: list = []
    table = tune_ffn_backends(up, down, True, 300, repeats=5, report=rows)
    assert [b for b, _ in rows] == token_buckets(300) and table[-1][0] == 300
    for bucket, timings in rows:
        name = next(n for b, n in table if bucket <= b)
        assert "dense" in timings and timings[name] <= timings["dense"], (bucket, timings, name)
    half = (w(hidden, rank), w(width, rank))
    assert tune_ffn_backends(tuple(t.half() for t in half), tuple(t.half() for t in down), True, 8,
                             repeats=2) == [(8, "dense")]  # float16: only dense may run
