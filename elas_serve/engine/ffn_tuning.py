"""`--ffn-backend auto`: pick the fastest FFN backend per number of tokens, measured at start-up.

On CUDA, each candidate backend runs the model's first ELAS FFN at a ladder of token counts (up to
the step's token budget); a candidate whose output differs from `dense` is dropped; the fastest
(median of repeats) wins that count. The result is a table `[(max_tokens, backend), ...]`: a call
with T tokens uses the first row with `T <= max_tokens`. On the CPU the Triton backends run only in
the interpreter, so `auto` is `dense` there without measuring.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from elas_serve.kernels.ffn import FFN_BACKENDS, ffn_dense
from elas_serve.models import ElasForCausalLM
from elas_serve.models.mlp import ElasMLP

log = logging.getLogger("elas_serve.engine")
TOKEN_LADDER = (1, 4, 16, 64, 256, 1024, 4096, 16384)
CANDIDATES = ("dense", "sparse24", "fused")


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    for _ in range(2):  # warm-up: compilation, autotuning, allocator
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def tune_ffn_backends(model: ElasForCausalLM, max_tokens: int, candidates: tuple[str, ...] = CANDIDATES,
                      repeats: int = 10) -> list[tuple[int, str]]:
    """The fastest correct backend per token count, as a routing table (see module docstring)."""
    mlp = next((layer.mlp for layer in model.model.layers if isinstance(layer.mlp, ElasMLP)), None)
    if mlp is None or mlp.up_proj.bias is not None or mlp.down_proj.bias is not None:
        return [(max_tokens, "dense")]
    up, down = mlp.up_proj.factors(), mlp.down_proj.factors()
    weight = model.output_weight
    ladder = sorted({t for t in TOKEN_LADDER if t < max_tokens} | {max_tokens})
    gen = torch.Generator(device=weight.device).manual_seed(0)
    table: list[tuple[int, str]] = []
    for num_tokens in ladder:
        x = torch.randn(num_tokens, model.config.hidden_size, generator=gen, device=weight.device).to(weight.dtype)
        ref = ffn_dense(x, up, down, mlp.two_by_four).float()
        timings = {}
        for name in candidates:
            fn = FFN_BACKENDS[name]
            out = fn(x, up, down, mlp.two_by_four).float()
            if not torch.allclose(out, ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item()):
                log.warning("ffn-backend auto: %s differs from dense at %d tokens; not used", name, num_tokens)
                continue
            timings[name] = _median_seconds(lambda: fn(x, up, down, mlp.two_by_four), weight.device, repeats)
        best = min(timings, key=timings.get)
        log.info("ffn-backend auto: %d tokens: %s", num_tokens,
                 ", ".join(f"{k} {1e6 * v:.1f} us" for k, v in sorted(timings.items(), key=lambda kv: kv[1])))
        if table and table[-1][1] == best:
            table[-1] = (num_tokens, best)
        else:
            table.append((num_tokens, best))
    return table


def describe(table: list[tuple[int, str]]) -> str:
    """'dense' for a one-row table, else e.g. 'auto(dense<=16,fused<=2048)'."""
    if len(table) == 1:
        return table[0][1]
    return "auto(" + ",".join(f"{name}<={n}" for n, name in table) + ")"
