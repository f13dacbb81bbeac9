"""How the runner calls the decoder: eagerly, or compiled by torch.compile (inductor).

Owns `Decoder`: `decoder(input_ids, positions, kv_caches)` under a `forward_context` runs the
decoder stack (`ElasModel.forward`) through the compiled code once it exists, else eagerly.
- `--enforce-eager` (as in vLLM): never compiled, no CUDA graphs.
- Otherwise the stack is compiled whole (`fullgraph=True`): attention is the opaque custom op
  `elas_serve::attention`, which reads its batch description from the forward context, and the
  FFN kernels are custom ops too, so the graph has no breaks and sees only (T,) ids and positions
  and the caches. The token dimension is dynamic (marked on the warm-up inputs): one graph per
  FFN-backend bucket of T >= 2 (one on the CPU) and, as torch specialises size 1, one for T = 1.
  No batch composition or sequence length ever recompiles. All are compiled by warm-ups over the
  null block (block 0, which no sequence owns).
- Inductor's caches are on disk under `~/.cache/elas_serve/inductor` (unless
  `$TORCHINDUCTOR_CACHE_DIR` says otherwise), so a second start reloads the compiled code.
- On CUDA the warm-ups run at start-up, before the CUDA graphs are captured over the compiled code.
  On the CPU they run on a background thread while the runner serves eagerly (a cold compile takes
  tens of seconds on 2 cores; the server answers meanwhile), and the runner switches over between
  two steps once every graph exists. A failed compile is logged and the runner stays eager.
NOTE: the eager and compiled paths compute the same function; inductor may reorder float sums, so
logits can differ in the last bits (greedy outputs of the demo model are identical: tests).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from elas_serve.models import AttentionMetadata, ElasForCausalLM
from elas_serve.models.attention import forward_context

log = logging.getLogger("elas_serve.engine")
INDUCTOR_CACHE_DIR = Path.home() / ".cache" / "elas_serve" / "inductor"
# NOTE: at import: torch writes its own default into the environment the first time anything asks
# for the cache directory (some start-up paths do, before any compile)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(INDUCTOR_CACHE_DIR))


def configure_inductor(cpu: bool) -> None:
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    # NOTE: on the CPU a C++ wrapper calls the ~14 kernels per layer: at decode sizes the Python
    # one's per-call overhead is a visible share of the forward
    inductor_config.cpp_wrapper = cpu
    # NOTE: one graph per FFN-backend bucket (the backend is chosen by T in Python), plus T = 1
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    if cpu:  # NOTE: one compile thread: worker processes would compete with serving for the CPU cores
        inductor_config.compile_threads = 1


def warmup_inputs(kv_caches: list[torch.Tensor], num_tokens: int
                  ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """`num_tokens` one-token sequences at position 0, every one writing and reading slot 0 of the
    null block: valid for any block size, harmless to any sequence."""
    device = kv_caches[0].device
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    meta = AttentionMetadata.from_lens(torch.zeros(num_tokens, dtype=torch.long, device=device),
                                       torch.zeros(num_tokens, 1, dtype=torch.int32, device=device),
                                       [1] * num_tokens, [1] * num_tokens)
    return ids, ids.clone(), meta


def warmup_sizes(bucket_bounds: list[float], max_num_batched_tokens: int) -> tuple[int, ...]:
    """One token count per graph: the smallest T >= 2 of each FFN-backend bucket (lo, hi] (the
    buckets' upper bounds given, capped at the budget), then T = 1."""
    bounds = sorted({min(n, max_num_batched_tokens) for n in bucket_bounds} | {1})
    sizes = tuple(int(max(2, lo + 1)) for lo, hi in zip(bounds, bounds[1:]) if hi >= max(2, lo + 1))
    return (sizes or (2,)) + (1,)


def _guard_options() -> dict:
    """No guards on the modules' own state: it is final before the compile (weights fused and laid
    out, FFN backends routed) and never changes after; the inputs' guards stay, and they are what
    tells T = 1 from T >= 2 and one FFN bucket from another.
    NOTE: evaluating guards on every module's attributes and parameters ("TorchDynamo Cache Lookup"
    in torch.profiler) was a visible share of a compiled batch-1 forward on the CPU."""
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    return {"guard_filter_fn": skip} if skip is not None else {}


class Decoder:
    def __init__(self, model: ElasForCausalLM, kv_caches: list[torch.Tensor], enforce_eager: bool,
                 background: bool, warmup_sizes: tuple[int, ...] = (2, 1)):
        self.eager: Callable[..., torch.Tensor] = model.model
        self.compiled: Callable[..., torch.Tensor] | None = None
        self.compile_seconds: float | None = None
        self.kv_caches = kv_caches
        self.enforce_eager = enforce_eager
        self.warmup_sizes = warmup_sizes
        self._done = threading.Event()
        if enforce_eager:
            self._done.set()
            return
        configure_inductor(cpu=kv_caches[0].device.type == "cpu")
        # NOTE: only the token dimension is dynamic (marked in the warm-up); `dynamic=True` would
        # also make the caches' sizes symbolic, and duck sizing then ties them to T by chance
        self._fn = torch.compile(model.model, fullgraph=True, dynamic=False, options=_guard_options())
        if background:
            threading.Thread(target=self._compile, name="elas-compile", daemon=True).start()
        else:
            self._compile()

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    @property
    def compiling(self) -> bool:
        return not self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the compile ended or `timeout` passed; whether the compiled code is in use."""
        self._done.wait(timeout)
        return self.is_compiled

    @torch.inference_mode()
    def _compile(self) -> None:
        t0 = time.monotonic()
        try:
            for num_tokens in self.warmup_sizes:
                ids, positions, meta = warmup_inputs(self.kv_caches, num_tokens)
                if num_tokens > 1:
                    torch._dynamo.mark_dynamic(ids, 0)
                    torch._dynamo.mark_dynamic(positions, 0)
                with forward_context(meta):
                    self._fn(ids, positions, self.kv_caches)
            self.compile_seconds = time.monotonic() - t0
            self.compiled = self._fn  # NOTE: before `_done` is set: a waiter then sees it
        except Exception:  # noqa: BLE001 (the eager path serves on)
            log.exception("torch.compile of the decoder failed; serving eagerly")
            return
        finally:
            self._done.set()
        log.info("decoder compiled in %.1f s (inductor cache: %s)", self.compile_seconds,
                 os.environ.get("TORCHINDUCTOR_CACHE_DIR"))

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, eager: bool = False) -> torch.Tensor:
        if eager or self.compiled is None:
            return self.eager(input_ids, positions, self.kv_caches)
        try:
            return self.compiled(input_ids, positions, self.kv_caches)
        except Exception:  # noqa: BLE001
            # NOTE: a compiler failure (e.g. a recompile past the limit) must not fail requests: serve
            # eagerly from now on. Rerunning is safe: the attention op rewrites the same keys/values.
            log.exception("the compiled decoder failed at T=%d; serving eagerly from now on", input_ids.shape[0])
            self.compiled = None
            return self.eager(input_ids, positions, self.kv_caches)
