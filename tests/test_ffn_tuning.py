"""`--ffn-backend auto`: the per-token-count routing table and how the model follows it.

(Which backend wins is a measurement, made at start-up on the serving device and reported by
benchmarks/bench_ffn.py; nothing here asserts a speed.) Run: python -m pytest tests/test_ffn_tuning.py -v
"""

from __future__ import annotations

import pytest
import torch

from elas_serve.engine.ffn_tuning import describe, tune_ffn_backends
from elas_serve.kernels import ffn as ffn_module
from elas_serve.models import load_model

from authors_ckpt import Variant, write_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tune_ckpt")
    write_checkpoint(path, Variant("tune", layers=2))
    return load_model(path)


def test_tuning_table_covers_the_budget(model):
    table = tune_ffn_backends(model, max_tokens=20, candidates=("dense", "fused"), repeats=1)
    counts = [n for n, _ in table]
    assert counts == sorted(counts) and counts[-1] == 20
    assert all(name in ("dense", "fused") for _, name in table)
    assert all(a != b for (_, a), (_, b) in zip(table, table[1:]))  # neighbours merged
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
