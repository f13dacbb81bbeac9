"""LLMEngine: add requests, run steps, emit outputs (synchronous; the async engine drives it).

`step()` is: schedule -> execute the model -> account the outputs (vLLM v1 `EngineCore.step`).
The engine validates prompts at `add_request` (empty, out-of-vocabulary ids, longer than the
context) and clamps `max_tokens` to what the context leaves, as vLLM does.
"""

from __future__ import annotations

import itertools
import os
import time

import torch

from elas_serve.config import EngineConfig
from elas_serve.errors import InvalidRequestError
from elas_serve.kernels.ffn_tuning import describe, tune_ffn_backends
from elas_serve.models import ElasForCausalLM, load_model
from elas_serve.models.mlp import ElasMLP
from elas_serve.sampling_params import SamplingParams
from elas_serve.tokenizer import Tokenizer
from elas_serve.utils import resolve_device, resolve_dtype

from .block_manager import BlockManager
from .model_runner import ModelRunner, kv_cache_block_bytes
from .output_processor import OutputProcessor
from .request import Request, RequestOutput, RequestStatus
from .scheduler import Scheduler
from .stats import StatLogger, StepStats

CPU_KV_CACHE_BYTES = 2 << 30  # default KV cache cap on CPU


class LLMEngine:
    def __init__(self, model: ElasForCausalLM, tokenizer: Tokenizer, config: EngineConfig):
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"{tokenizer.name}: tokenizer has {tokenizer.vocab_size} tokens but the "
                             f"model's vocab_size is {model.config.vocab_size}")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        self.ffn_backend = self._select_ffn_backend(config.ffn_backend)
        num_blocks = self._num_kv_blocks()
        self.block_manager = BlockManager(num_blocks + 1, config.block_size, config.enable_prefix_caching)
        self.runner = ModelRunner(model, num_blocks + 1, config.block_size, self.max_model_len,
                                  config.max_num_seqs, config.seed, config.enforce_eager)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.output_processor = OutputProcessor(tokenizer, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self.stat_loggers: list[StatLogger] = []
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        device = resolve_device(config.device)
        if device.type == "cpu":
            # NOTE: one core is left to the HTTP server and the tokenizer; a small model gains
            # little from more threads, and oversubscribed OpenMP threads spin (10x slower steps).
            torch.set_num_threads(config.cpu_threads or max(1, (os.cpu_count() or 2) - 1))
        model = load_model(config.model, resolve_dtype(config.dtype, device), device)
        tokenizer = Tokenizer.from_path(config.tokenizer or config.model, model.config.eos_token_ids)
        return cls(model, tokenizer, config)

    def _select_ffn_backend(self, name: str) -> str:
        """Route the model's FFNs; returns the backend's description (for logs and metrics)."""
        on_cpu = self.model.output_weight.device.type == "cpu"
        if name in ("sparse24", "fused") and on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
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

    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt) if prompt else []
        else:
            ids = list(prompt)
            vocab = self.model.config.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"token id {bad[0]!r} is outside the vocabulary [0, {vocab})", "prompt")
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        return ids

    def make_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams,
                     arrival_time: float | None = None) -> Request:
        """Validate a prompt and build its request; touches no engine state (any thread may call).
        `max_tokens` is clamped to what the context leaves (as vLLM does)."""
        ids = self.tokenize_prompt(prompt)
        room = self.max_model_len - len(ids)
        if len(ids) > self.max_model_len or (room == 0 and params.max_tokens != 0):
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"prompt contains {len(ids)} input tokens, which leaves no room for the completion.", "prompt")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        req = Request(request_id, ids, params, self.tokenizer.eos_token_ids, arrival_time)
        req.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        return req

    def add(self, req: Request) -> None:
        """Queue a request built by `make_request` (n must be 1: fan out with `params.child(i)`)."""
        if req.request_id in self.requests:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.output_processor.add(req)
        self.scheduler.add_request(req)

    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> Request:
        req = self.make_request(request_id, prompt, params, arrival_time)
        self.add(req)
        return req

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is, free its blocks; its final output (None if unknown)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        out = self.output_processor.aborted(req)
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        return out

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self.scheduler.finish_request(req, status)
        req.times.finished = time.monotonic()
        self.runner.release(req.request_id)
        self.output_processor.remove(req.request_id)
        self.requests.pop(req.request_id, None)
        for logger in self.stat_loggers:
            logger.on_finished(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        stats = StepStats(start=time.monotonic())
        sched = self.scheduler.schedule()
        stats.t_schedule = time.monotonic()
        if sched.is_empty:
            return []
        result = self.runner.execute(sched, self.block_manager)
        stats.t_forward = now = time.monotonic()
        self.scheduler.update_from_output(sched)
        outputs = []
        for req, _ in sched.scheduled:
            prompt_was_done = req.num_output_tokens > 0
            if req.request_id in result.prompt_logprobs:
                first, items = result.prompt_logprobs[req.request_id]
                if not req.prompt_logprobs:
                    req.prompt_logprobs.append(None)  # nothing scores the first prompt token
                assert first == len(req.prompt_logprobs)
                req.prompt_logprobs.extend(items)
            prompt_done = not prompt_was_done and req.num_computed_tokens >= req.num_prompt_tokens
            token = result.sampled.get(req.request_id)
            if token is not None:
                if req.times.first_token is None:
                    req.times.first_token = now
                    stats.ttfts.append(now - req.times.arrival)
                else:
                    stats.itls.append(now - req.times.last_token)
                req.times.last_token = now
                stats.num_generation_tokens += 1
            if prompt_done:
                stats.num_prompt_tokens += req.num_prompt_tokens
            out, status = self.output_processor.process(req, token, result.logprobs.get(req.request_id),
                                                        prompt_done)
            if status is not None:
                self._finish(req, status)
            if out is not None:
                outputs.append(out)
        stats.end = time.monotonic()
        stats.num_running, stats.num_waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        stats.kv_cache_usage = self.block_manager.usage
        stats.num_batched_tokens = sched.num_batched_tokens
        stats.num_preemptions = len(sched.preempted)
        stats.num_prefix_queried_tokens = sched.num_prefix_queried_tokens
        stats.num_prefix_hit_tokens = sched.num_prefix_hit_tokens
        stats.ffn_activation_density = result.ffn_activation_density
        for logger in self.stat_loggers:
            logger.on_step(stats)
        return outputs
