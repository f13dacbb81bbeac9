"""EngineCore: the model, the scheduler and the KV cache; `step()` turns requests into tokens.

`step()` is vLLM v1's `EngineCore.step`: schedule -> execute -> `update_from_output` -> outputs.
If executing the model or accounting its results raises, only the requests of that step fail
(each gets a final output with the error; their blocks are freed) and the core carries on;
`num_consecutive_failed_steps` counts such steps, and whoever drives the core declares it dead
after `MAX_CONSECUTIVE_FAILED_STEPS`. The core knows no text: requests arrive tokenized and
validated (`frontend/processor.py`), and stop strings are the front end's.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time

import torch

from elas_serve.config import EngineConfig
from elas_serve.kernels.backends import TRITON_BACKENDS
from elas_serve.kernels.ffn_tuning import describe, tune_ffn_backends
from elas_serve.models import ElasForCausalLM, load_model
from elas_serve.models.mlp import ElasMLP
from elas_serve.utils import resolve_device, resolve_dtype

from .block_manager import BlockManager
from .messages import EngineCoreOutputs, EngineCoreRequest, ModelInfo
from .model_runner import ModelRunner, kv_cache_block_bytes
from .request import Request, RequestStatus
from .scheduler import Scheduler

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
CPU_KV_CACHE_BYTES = 2 << 30  # default KV cache cap on CPU
MAX_CONSECUTIVE_FAILED_STEPS = 3
log = logging.getLogger("elas_serve.engine")


def keep_freed_memory() -> None:
    """glibc: serve large allocations from the heap and keep what is freed (up to 1 GiB).

    NOTE: by default glibc maps every allocation over ~128 KiB-32 MiB afresh and unmaps it on free,
    so each of a CPU step's multi-MB temporaries costs a page fault per 4 KiB, every step (page
    faults per step: `benchmarks/bench_step.py`). The price: the process's RSS does not shrink
    after a peak. No-op where there is no glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        pass


class EngineCore:
    def __init__(self, model: ElasForCausalLM, config: EngineConfig):
        self.model, self.config = model, config
        model.prepare_for_serving()
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        self.ffn_backend = self._select_ffn_backend(config.ffn_backend)
        num_blocks = self._num_kv_blocks()
        block_manager = BlockManager(num_blocks + 1, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, num_blocks + 1, config.block_size, self.max_model_len,
                                  config.max_num_seqs, config.seed, config.enforce_eager,
                                  config.max_num_batched_tokens)
        self.num_consecutive_failed_steps = 0
        weight = model.output_weight
        self.model_info = ModelInfo(
            model=str(config.model), max_model_len=self.max_model_len, vocab_size=model.config.vocab_size,
            eos_token_ids=model.config.eos_token_ids, dtype=str(weight.dtype).removeprefix("torch."),
            device=str(weight.device), ffn_backend=self.ffn_backend, num_kv_blocks=num_blocks,
            block_size=config.block_size)

    @classmethod
    def from_config(cls, config: EngineConfig) -> "EngineCore":
        device = resolve_device(config.device)
        if device.type == "cpu":
            # NOTE: one core is left to the HTTP server and the tokenizer (another process); a small
            # model gains little from more threads, and oversubscribed OpenMP threads spin (on 2
            # loaded cores, 2 threads decoded slower than 1 in an uncommitted one-off check), so
            # cpu_count - 1 stays the default; --cpu-threads overrides it on an idle machine.
            torch.set_num_threads(config.cpu_threads or max(1, (os.cpu_count() or 2) - 1))
            keep_freed_memory()
        return cls(load_model(config.model, resolve_dtype(config.dtype, device), device), config)

    def _select_ffn_backend(self, name: str) -> str:
        """Route the model's FFNs; returns the backend's description (for logs and metrics)."""
        on_cpu = self.model.output_weight.device.type == "cpu"
        if name in TRITON_BACKENDS and on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"--ffn-backend {name} runs Triton kernels: on the CPU they need the "
                             f"interpreter (TRITON_INTERPRET=1 set before start-up); use dense or auto")
        if name == "auto":
            # NOTE: on the CPU the Triton backends exist only in the interpreter: dense, unmeasured
            budget = self.config.max_num_batched_tokens
            mlp = next((layer.mlp for layer in self.model.model.layers if isinstance(layer.mlp, ElasMLP)), None)
            tunable = mlp is not None and mlp.up_proj.bias is None and mlp.down_proj.bias is None
            table = tune_ffn_backends(mlp.up_proj.factors(), mlp.down_proj.factors(), mlp.two_by_four, budget) \
                if tunable and not on_cpu else [(budget, "dense")]
            self.model.set_ffn_backend(table)
            return describe(table)
        self.model.set_ffn_backend(name)
        return name

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        block_bytes = kv_cache_block_bytes(self.model, cfg.block_size, self.model.output_weight.dtype)
        if cfg.num_kv_blocks is not None:
            num = cfg.num_kv_blocks
        elif cfg.kv_cache_memory is not None:
            num = cfg.kv_cache_memory // block_bytes
        elif self.model.output_weight.device.type == "cuda":
            num = self._profile_cuda_kv_blocks(block_bytes)
        else:
            wanted = -(-cfg.max_num_seqs * self.max_model_len // cfg.block_size)
            num = min(wanted, CPU_KV_CACHE_BYTES // block_bytes)
        need = -(-self.max_model_len // cfg.block_size)
        if num < need:
            raise ValueError(f"the KV cache holds {num} blocks of {cfg.block_size} tokens, fewer than the "
                             f"{need} one sequence of max_model_len={self.max_model_len} needs: give it "
                             f"more memory or lower --max-model-len")
        return num

    @torch.inference_mode()
    def _profile_cuda_kv_blocks(self, block_bytes: int) -> int:
        """Blocks that fit in what a warm-up forward of a full token budget leaves free."""
        device = self.model.output_weight.device
        torch.cuda.reset_peak_memory_stats(device)
        n = min(self.config.max_num_batched_tokens, self.max_model_len)
        ids = torch.zeros(1, n, dtype=torch.long, device=device)
        self.model.compute_logits(self.model(ids, torch.arange(n, device=device)[None]))
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        peak, current = torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
        budget = total * self.config.gpu_memory_utilization - used - peak + current
        return max(int(budget // block_bytes), 0)

    # ------------------------------------------------------------------ requests

    def add_request(self, request: EngineCoreRequest) -> None:
        self.scheduler.add_request(Request.from_core_request(request))

    def abort_requests(self, request_ids: list[str]) -> EngineCoreOutputs:
        """Stop requests wherever they are (unknown ids are ignored); their final outputs."""
        outputs = self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        return EngineCoreOutputs(outputs, self.scheduler.make_stats())

    def abort_all(self) -> EngineCoreOutputs:
        return self.abort_requests(list(self.scheduler.requests))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ------------------------------------------------------------------ the step

    def step(self) -> EngineCoreOutputs:
        t0 = time.monotonic()
        sched = self.scheduler.schedule()
        t1 = time.monotonic()
        if sched.is_empty:
            return EngineCoreOutputs([], self.scheduler.make_stats())
        try:
            result = self.runner.execute(sched)
            t2 = time.monotonic()
            outputs = self.scheduler.update_from_output(sched, result)
        except Exception as e:  # noqa: BLE001 (contained: the step's requests fail, nothing else)
            self.num_consecutive_failed_steps += 1
            failed = [req.request_id for req, _ in sched.scheduled if not req.is_finished]
            log.exception("engine step failed (%d in a row); failing its %d request(s)",
                          self.num_consecutive_failed_steps, len(failed))
            message = f"the engine step serving this request failed: {type(e).__name__}: {e}"
            outputs = self.scheduler.finish_requests(failed, RequestStatus.FINISHED_ERROR, message)
            return EngineCoreOutputs(outputs, self.scheduler.make_stats())
        self.num_consecutive_failed_steps = 0
        for out in outputs:
            if out.finish_reason == "error":
                log.warning("request %s failed: %s", out.request_id, out.error)
        stats = self.scheduler.make_stats()
        stats.step_seconds = {"schedule": t1 - t0, "forward": t2 - t1, "output": time.monotonic() - t2}
        stats.ffn_activation_density = result.ffn_activation_density
        return EngineCoreOutputs(outputs, stats)

    @property
    def dead_reason(self) -> str | None:
        if self.num_consecutive_failed_steps >= MAX_CONSECUTIVE_FAILED_STEPS:
            return f"{self.num_consecutive_failed_steps} engine steps failed in a row"
        return None
