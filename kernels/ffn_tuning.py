"""`--ffn-backend auto`: the fastest FFN backend per token-count bucket, measured at start-up.

Input: one ELAS FFN's factors (up, down, two_by_four; the model's first, all layers have the same
shapes) and the step's token budget. Buckets are the powers of two up to the budget, plus the budget:
every regime boundary of the backends (tile heights, the decode GEMV, cuSPARSELt, split-K) is a
power of two, so every T in (b/2, b] runs the kernels b runs, and a call with T tokens takes the
first row with T <= max_tokens.

On CUDA, per bucket: each candidate's output is checked against `ffn_reference` (a candidate that
differs is dropped there); each remaining one is captured as a CUDA graph of one call and timed as
graph replays (no launch overhead, as decode graphs replay it) with the L2 cache flushed before
every replay (the weights come from HBM, as when the layers run in turn), median of `repeats`. A
sparse backend replaces `dense` (the epilogue-fused dense chain, the best dense backend) only when
faster by `margin`: `auto` is never slower than `dense` at a measured bucket. cuSPARSELt plans are
made before any capture (`sparse24_cslt.prepare`). float16 leaves only `dense` (the sparse backends
refuse it). On the CPU the Triton backends run only in the interpreter: `auto` is `dense` there.
"""

from __future__ import annotations

import logging
import statistics

import torch
import triton

from . import sparse24_cslt
from .ffn import FFN_BACKENDS, Factors, down_split, ffn_reference

log = logging.getLogger("elas_serve.kernels")
CANDIDATES = ("dense", "sparse24", "fused")
L2_FLUSH_BYTES = 256 << 20  # several times the L2 of an H100/H200 (50 MB)


def token_buckets(max_tokens: int) -> list[int]:
    """1, 2, 4, ... below `max_tokens`, then `max_tokens`."""
    buckets, b = [], 1
    while b < max_tokens:
        buckets.append(b)
        b *= 2
    return buckets + [max_tokens]


def choose(timings: dict[str, float], margin: float) -> str:
    """The fastest backend, keeping `dense` unless another beats it by `margin` (or dense failed)."""
    best = min(timings, key=timings.get)
    if "dense" in timings and timings[best] > (1 - margin) * timings["dense"]:
        return "dense"
    return best


def build_table(rows: list[tuple[int, dict[str, float]]], margin: float = 0.02) -> list[tuple[int, str]]:
    """Routing table from per-bucket timings [(bucket, {backend: seconds})], neighbours merged."""
    table: list[tuple[int, str]] = []
    for bucket, timings in rows:
        name = choose(timings, margin) if timings else "dense"
        if table and table[-1][1] == name:
            table[-1] = (bucket, name)
        else:
            table.append((bucket, name))
    return table


def graph_replay_seconds(fn, repeats: int) -> float:
    """Median seconds of replaying a CUDA graph of `fn()`, with the L2 flushed before each replay."""
    fn()  # warm-up outside the graph: compiles kernels, makes plans and padded weights
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    times = []
    for _ in range(repeats + 1):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times[1:])


def _agrees(out: torch.Tensor, ref: torch.Tensor) -> bool:
    # NOTE: 2:4 selection flips at near-ties where a kernel's accumulation order differs from the
    # reference's, moving a row by ~1/sqrt(F): a loose bound; a wrong kernel is off by O(1)
    err = (out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)
    return bool(err < 5e-2)


@torch.inference_mode()
def tune_ffn_backends(up: Factors, down: Factors, two_by_four: bool, max_tokens: int,
                      candidates: tuple[str, ...] = CANDIDATES, repeats: int = 20, margin: float = 0.02,
                      report: list | None = None) -> list[tuple[int, str]]:
    """The routing table [(max_tokens, backend), ...] for one FFN's factors (module docstring).

    `report`, if given, receives the measured (bucket, {backend: seconds}) rows.
    """
    weight = up[1]
    if weight.device.type != "cuda":
        return [(max_tokens, "dense")]
    if weight.dtype == torch.float16:
        candidates = tuple(c for c in candidates if c == "dense")
    unknown = [c for c in candidates if c not in FFN_BACKENDS]
    if unknown:
        raise ValueError(f"unknown FFN backends {unknown} (available: {', '.join(FFN_BACKENDS)})")
    hidden = up[0].shape[0] if up[0] is not None else up[1].shape[1]
    if "sparse24" in candidates and two_by_four:
        sparse24_cslt.prepare(down_split(down)[0], up[1].shape[0], triton.next_power_of_2(max_tokens))
    gen = torch.Generator(device=weight.device).manual_seed(0)
    rows = []
    for bucket in token_buckets(max_tokens):
        x = torch.randn(bucket, hidden, generator=gen, device=weight.device).to(weight.dtype)
        ref = ffn_reference(x, up, down, two_by_four)
        timings = {}
        for name in candidates:
            fn = FFN_BACKENDS[name]
            try:
                if not _agrees(fn(x, up, down, two_by_four), ref):
                    log.warning("ffn-backend auto: %s differs from the reference at %d tokens; not used", name, bucket)
                    continue
                timings[name] = graph_replay_seconds(lambda: fn(x, up, down, two_by_four), repeats)
            except RuntimeError as e:  # e.g. a path that cannot be graph-captured
                log.warning("ffn-backend auto: %s fails at %d tokens (%s); not used", name, bucket, e)
        log.info("ffn-backend auto: %d tokens: %s", bucket,
                 ", ".join(f"{k} {1e6 * v:.1f} us" for k, v in sorted(timings.items(), key=lambda kv: kv[1])))
        rows.append((bucket, timings))
    if report is not None:
        report.extend(rows)
    return build_table(rows, margin)


def describe(table: list[tuple[int, str]]) -> str:
    """'dense' for a one-row table, else e.g. 'auto(dense<=16,fused<=2048)'."""
    if len(table) == 1:
        return table[0][1]
    return "auto(" + ",".join(f"{name}<={n}" for n, name in table) + ")"
