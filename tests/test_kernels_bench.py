"""The FFN benchmark's entry point (`benchmarks/bench_ffn.run`, what the GPU suite calls) runs end
to end on the CPU (interpreter, tiny shapes), and its roofline model (`benchmarks/ffn_roofline.py`)
gives the review's figures for the eager chains (counted op by op) and the epilogue-fused chain.
The timings of a CPU run mean nothing; nothing here asserts a speed.
Run: python -m pytest tests/test_kernels_bench.py -v
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_ffn  # noqa: E402
import ffn_roofline as roof  # noqa: E402


def test_bench_runs_every_variant_on_the_cpu():
    result = bench_ffn.run(bench_ffn.QUICK_SHAPES, (1, 33), device="cpu", repeats=1, compile_baseline=False,
                           progress=False)
    timed = {(r["tokens"], r["variant"]) for r in result["rows"] if "median_us" in r}
    assert not [r for r in result["rows"] if r["mode"] == "error"]
    for m in (1, 33):
        assert {(m, v) for v in ("eager_masked", "eager_unmasked", "dense", "sparse24", "sparse24_triton", "fused",
                                 "core_dense")} <= timed
    assert (1, "sparse24_gemv") in timed and (33, "sparse24_gemv") not in timed
    assert result["checks"] and all(c["ok"] for c in result["checks"])
    assert all(r["bytes"] > 0 and r["flops"] > 0 and r["roofline_us"] > 0 for r in result["rows"])
    assert result["targets"] == []  # CPU times evaluate no target
    assert "CPU run under the Triton interpreter" in bench_ffn.markdown(result)


@pytest.mark.parametrize("variant,m,us", [("eager_unmasked", 4096, 69.3), ("dense", 4096, 29.2),
                                          ("ideal_sparse", 4096, 19.6)])
def test_roofline_matches_the_review_arithmetic(variant, m, us):
    """docs/../review-2026-12/kernels.md, table (b): H100, 350m. (Its masked eager chain, 428 us at
    M=4096, was the mask's old 37 ops; the one counted now is below.)"""
    got = roof.roofline(variant, m, 1024, 4104, 256, roof.H100)["roofline_us"]
    assert abs(got - us) / us < 0.02, got


def test_eager_chains_are_counted_op_by_op():
    masked = roof.eager_kernels(True, 64, 1024, 4104, 256)
    unmasked = roof.eager_kernels(False, 64, 1024, 4104, 256)
    assert len(unmasked) == 6 and len(masked) == 24  # 4 GEMMs + relu + square; the mask's 18 ops
    got = roof.roofline("eager_masked", 4096, 1024, 4104, 256, roof.H100)["roofline_us"]
    unmasked_us = roof.roofline("eager_unmasked", 4096, 1024, 4104, 256, roof.H100)["roofline_us"]
    assert unmasked_us < got < 428 / 2  # the mask still costs its bytes, less than half the review's chain
