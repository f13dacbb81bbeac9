"""ModelRunner: the bridge from scheduled requests to tensors and back.

Owns the KV cache tensors (one `(2, num_blocks, block_size, num_kv_heads, head_dim)` tensor per
layer), builds each step's flattened batch (`input_ids`, `positions`, `slot_mapping`,
`block_tables`, `query_start_loc`, `seq_lens`) from the `SchedulerOutput` alone, runs the decoder
(`compilation.Decoder`: compiled unless `enforce_eager`; on CUDA, decode-only steps replay CUDA
graphs) and samples. Rows are ordered as `SchedulerOutput.scheduled`. A request gets a sampled
token when this step brings it level with its tokens; requests asking for prompt log-probs get them
for the prompt positions computed in this step. The runner reads requests and never changes them;
its own per-request state (seeded generators) is dropped when the scheduler reports the request
finished. At most every `DENSITY_INTERVAL_S` seconds a step runs eagerly with forward pre-hooks on
the ELAS FFNs that sample the activation density (the compiled code has no hooks).

Positions and slots are computed from per-sequence tensors (O(batch) host work, not O(tokens));
only the token ids themselves are gathered in Python.
"""

from __future__ import annotations

import mmap
import time

import torch

from elas_serve.models import AttentionMetadata, ElasForCausalLM
from elas_serve.models.attention import forward_context
from elas_serve.models.mlp import ElasMLP

from .block_manager import NULL_BLOCK
from .compilation import Decoder, warmup_sizes
from .cuda_graph import CUDAGraphRunner
from .request import Request
from .sampler import SamplingRow, sample, token_logprobs
from .scheduler import RunnerOutput, SchedulerOutput

DENSITY_INTERVAL_S = 5.0


def kv_cache_block_bytes(model: ElasForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.config
    return (2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim
            * torch.finfo(dtype).bits // 8)


def allocate_kv_cache(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed cache. NOTE: zeros so that padded reads of never-written slots are finite; on the CPU
    from an anonymous mapping, whose pages the kernel zeroes on first touch, so an unused cache costs
    no resident memory and no start-up time (torch.zeros would write every byte)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


class ModelRunner:
    def __init__(self, model: ElasForCausalLM, num_blocks: int, block_size: int, max_model_len: int,
                 max_num_seqs: int, seed: int = 0, enforce_eager: bool = True, max_num_batched_tokens: int = 2048):
        cfg = model.config
        self.model = model
        self.device = model.output_weight.device
        self.dtype = model.output_weight.dtype
        self.block_size = block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.kv_caches = [allocate_kv_cache((2, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim),
                                            self.dtype, self.device) for _ in range(cfg.num_hidden_layers)]
        self.shared_generator = torch.Generator(device=self.device).manual_seed(seed)
        self.generators: dict[str, torch.Generator] = {}
        self.mlps = [m for m in model.modules() if isinstance(m, ElasMLP)]
        self.last_density_time = -float("inf")
        on_cuda = self.device.type == "cuda"
        sizes = warmup_sizes([n for m in self.mlps for n, _ in m.ffn_table], max_num_batched_tokens)
        self.decoder = Decoder(model, self.kv_caches, enforce_eager, background=not on_cuda, warmup_sizes=sizes)
        self.graphs = None
        if on_cuda and not enforce_eager:
            self.graphs = CUDAGraphRunner(self.decoder, cfg.hidden_size, self.dtype, max_num_seqs,
                                          self.max_blocks_per_seq)

    def _generator(self, req: Request) -> torch.Generator:
        if req.params.seed is None:
            return self.shared_generator
        if req.request_id not in self.generators:
            self.generators[req.request_id] = torch.Generator(device=self.device).manual_seed(req.params.seed)
        return self.generators[req.request_id]

    def prepare_inputs(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids (T,), positions (T,), metadata) of the scheduled batch."""
        ids: list[int] = []
        query_lens, seq_lens, tables = [], [], []
        for req, n in out.scheduled:
            start = req.num_computed_tokens
            ids += req.all_token_ids[start:start + n]
            query_lens.append(n)
            seq_lens.append(start + n)
            tables.append(out.block_tables[req.request_id])
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [NULL_BLOCK] * (width - len(t)) for t in tables], dtype=torch.int32)
        lens = torch.tensor([query_lens, seq_lens], dtype=torch.int32)  # (2, B)
        num_tokens = len(ids)
        seq_idx = torch.repeat_interleave(torch.arange(len(query_lens)), lens[0], output_size=num_tokens)  # (T,)
        query_start_loc = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
        torch.cumsum(lens[0], 0, out=query_start_loc[1:])
        # the row's position: its sequence's first new position + its offset among the new rows
        positions = (lens[1] - lens[0])[seq_idx] + torch.arange(num_tokens) - query_start_loc[seq_idx]  # (T,)
        slots = block_tables[seq_idx, positions // self.block_size].long() * self.block_size \
            + positions % self.block_size
        dev = self.device
        meta = AttentionMetadata(slots.to(dev), block_tables.to(dev), query_start_loc.to(dev), lens[1].to(dev),
                                 query_lens, seq_lens)
        return torch.tensor(ids, device=dev), positions.long().to(dev), meta

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        for request_id in out.finished_req_ids:
            self.generators.pop(request_id, None)
        input_ids, positions, meta = self.prepare_inputs(out)
        sample_rows: list[tuple[int, Request]] = []
        prompt_rows: list[tuple[int, Request, int]] = []  # (row, request, index of scored token)
        row0 = 0
        for req, n in out.scheduled:
            start = req.num_computed_tokens
            if start + n == req.num_tokens and req.num_output_tokens < req.max_tokens:
                sample_rows.append((row0 + n - 1, req))
            if req.wants_prompt_logprobs:
                # row of position p scores prompt token p + 1; skip tokens already scored
                first = max(start, len(req.prompt_logprobs) - 1, 0)
                for p in range(first, min(start + n, req.num_prompt_tokens - 1)):
                    prompt_rows.append((row0 + p - start, req, p + 1))
            row0 += n
        density = self._density_step()
        if density is not None:
            handles = [m.register_forward_pre_hook(lambda m, args: density.append(
                (m.up_proj(args[0]) > 0).float().mean())) for m in self.mlps]
            try:
                with forward_context(meta):
                    hidden = self.decoder(input_ids, positions, eager=True)
            finally:
                for h in handles:
                    h.remove()
        elif self.graphs is not None and self.graphs.can_run(meta.query_lens_cpu):
            hidden = self.graphs.run(input_ids, positions, meta)
        else:
            with forward_context(meta):
                hidden = self.decoder(input_ids, positions)
        result = self._sample(hidden, sample_rows, prompt_rows)
        if density:
            result.ffn_activation_density = torch.stack(density).mean().item()
        return result

    def _density_step(self) -> list[torch.Tensor] | None:
        """A list to collect density samples in when this step should sample them, else None."""
        now = time.monotonic()
        if not self.mlps or now - self.last_density_time < DENSITY_INTERVAL_S:
            return None
        if self.decoder.compiling:
            return None  # NOTE: no hooks on the modules while a background compile traces them
        self.last_density_time = now
        return []

    def _sample(self, hidden: torch.Tensor, sample_rows: list[tuple[int, Request]],
                prompt_rows: list[tuple[int, Request, int]]) -> RunnerOutput:
        result = RunnerOutput()
        rows = [r for r, _ in sample_rows] + [r for r, _, _ in prompt_rows]
        if not rows:
            return result
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])  # (N, V)
        row_reqs = [req for _, req in sample_rows] + [req for _, req, _ in prompt_rows]
        # NOTE: a row is finite iff its float64 sum is (NaN and inf propagate, inf - inf is NaN, and
        # no sum of float32 values overflows float64): one pass instead of isfinite's four
        bad = (~logits.sum(-1, dtype=torch.float64).isfinite()).nonzero().flatten().tolist()
        if bad:  # NOTE: those requests fail; their rows are zeroed so the batch's sampling stays finite
            logits[bad] = 0.0
            result.failed = {row_reqs[i].request_id: "the model's logits are not finite (NaN or inf)" for i in bad}
        reqs = [req for _, req in sample_rows]
        want_lp = any(r.params.logprobs is not None for r in reqs) or bool(prompt_rows)
        logprobs = torch.log_softmax(logits, dim=-1) if want_lp else None
        if reqs:
            sampling_rows = [SamplingRow(
                r.params, r.prompt_token_ids, r.output_token_ids,
                r.eos_token_ids + r.params.stop_token_ids if r.num_output_tokens < r.params.min_tokens else [],
                self._generator(r)) for r in reqs]
            tokens = sample(logits[:len(reqs)], sampling_rows)  # NOTE: edits logits, not the logprobs made above
            result.sampled = {r.request_id: t for r, t in zip(reqs, tokens)}
            lp_reqs = [(i, r) for i, r in enumerate(reqs) if r.params.logprobs is not None]
            if lp_reqs:
                lps = token_logprobs(logprobs[[i for i, _ in lp_reqs]], [tokens[i] for i, _ in lp_reqs],
                                     [r.params.logprobs for _, r in lp_reqs])
                result.logprobs = {r.request_id: lp for (_, r), lp in zip(lp_reqs, lps)}
        if prompt_rows:
            scored = [req.all_token_ids[idx] for _, req, idx in prompt_rows]
            lps = token_logprobs(logprobs[len(reqs):], scored, [req.params.prompt_logprobs for _, req, _ in prompt_rows])
            for (_, req, idx), lp in zip(prompt_rows, lps):
                result.prompt_logprobs.setdefault(req.request_id, (idx, []))[1].append(lp)
        return result
