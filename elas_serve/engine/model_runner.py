"""ModelRunner: the bridge from scheduled requests to tensors and back.

Owns the KV cache tensors (one `(2, num_blocks, block_size, num_kv_heads, head_dim)` tensor per
layer), builds each step's flattened batch (`input_ids`, `positions`, `slot_mapping`,
`block_tables`) from the `SchedulerOutput` alone, runs the model, and samples. Rows are ordered
as `SchedulerOutput.scheduled`. A request gets a sampled token when this step brings it level with
its tokens; requests asking for prompt log-probs get them for the prompt positions computed in
this step. The runner reads requests and never changes them; its own per-request state (seeded
generators) is dropped when the scheduler reports the request finished. Every `DENSITY_EVERY`-th
eager step, forward pre-hooks it installs on the ELAS FFNs sample the activation density.
"""

from __future__ import annotations

import torch

from elas_serve.models import AttentionMetadata, ElasForCausalLM
from elas_serve.models.mlp import ElasMLP

from .block_manager import NULL_BLOCK
from .cuda_graph import CUDAGraphRunner
from .request import Request
from .sampler import SamplingRow, sample, token_logprobs
from .scheduler import RunnerOutput, SchedulerOutput

DENSITY_EVERY = 16


def kv_cache_block_bytes(model: ElasForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.config
    return (2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim
            * torch.finfo(dtype).bits // 8)


class ModelRunner:
    def __init__(self, model: ElasForCausalLM, num_blocks: int, block_size: int, max_model_len: int,
                 max_num_seqs: int, seed: int = 0, enforce_eager: bool = True):
        cfg = model.config
        self.model = model
        self.device = model.output_weight.device
        self.dtype = model.output_weight.dtype
        self.block_size = block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        # NOTE: zero-filled so padded reads of never-written slots are finite.
        self.kv_caches = [torch.zeros(2, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim,
                                      dtype=self.dtype, device=self.device)
                          for _ in range(cfg.num_hidden_layers)]
        self.shared_generator = torch.Generator(device=self.device).manual_seed(seed)
        self.generators: dict[str, torch.Generator] = {}
        self.graphs = None
        self.num_steps = 0
        self._density: list[torch.Tensor] | None = None  # collecting this step's samples when a list
        for mlp in (m for m in model.modules() if isinstance(m, ElasMLP)):
            mlp.register_forward_pre_hook(self._sample_density)
        if self.device.type == "cuda" and not enforce_eager:
            self.graphs = CUDAGraphRunner(model, self.kv_caches, max_num_seqs, self.max_blocks_per_seq)

    def _sample_density(self, mlp: ElasMLP, args: tuple) -> None:
        """Forward pre-hook: fraction of positive pre-activations (non-zeros after relu²)."""
        if self._density is not None:
            self._density.append((mlp.up_proj(args[0]) > 0).float().mean())

    def _generator(self, req: Request) -> torch.Generator:
        if req.params.seed is None:
            return self.shared_generator
        if req.request_id not in self.generators:
            self.generators[req.request_id] = torch.Generator(device=self.device).manual_seed(req.params.seed)
        return self.generators[req.request_id]

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        for request_id in out.finished_req_ids:
            self.generators.pop(request_id, None)
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        query_lens, seq_lens = [], []
        sample_rows: list[tuple[int, Request]] = []
        prompt_rows: list[tuple[int, Request, int]] = []  # (row, request, index of scored token)
        for req, n in out.scheduled:
            start = req.num_computed_tokens
            table = out.block_tables[req.request_id]
            row0 = len(ids)
            ids += req.all_token_ids[start:start + n]
            positions += range(start, start + n)
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            tables.append(table)
            query_lens.append(n)
            seq_lens.append(start + n)
            if start + n == req.num_tokens and req.num_output_tokens < req.max_tokens:
                sample_rows.append((row0 + n - 1, req))
            if req.wants_prompt_logprobs:
                # row of position p scores prompt token p + 1; skip tokens already scored
                first = max(start, len(req.prompt_logprobs) - 1, 0)
                for p in range(first, min(start + n, req.num_prompt_tokens - 1)):
                    prompt_rows.append((row0 + p - start, req, p + 1))
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [NULL_BLOCK] * (width - len(t)) for t in tables],
                                    dtype=torch.int32, device=self.device)
        input_ids = torch.tensor(ids, device=self.device)
        pos = torch.tensor(positions, device=self.device)
        slot_mapping = torch.tensor(slots, device=self.device)
        self.num_steps += 1
        density = None
        if self.graphs is not None and self.graphs.can_run(query_lens):
            hidden = self.graphs.run(input_ids, pos, slot_mapping, block_tables, seq_lens)
        else:
            self._density = [] if self.num_steps % DENSITY_EVERY == 1 else None
            meta = AttentionMetadata(slot_mapping, block_tables, query_lens, seq_lens)
            try:
                hidden = self.model(input_ids, pos, meta, self.kv_caches)
            finally:
                density, self._density = self._density, None
        result = self._sample(hidden, sample_rows, prompt_rows)
        if density:
            result.ffn_activation_density = torch.stack(density).mean().item()
        return result

    def _sample(self, hidden: torch.Tensor, sample_rows: list[tuple[int, Request]],
                prompt_rows: list[tuple[int, Request, int]]) -> RunnerOutput:
        result = RunnerOutput()
        rows = [r for r, _ in sample_rows] + [r for r, _, _ in prompt_rows]
        if not rows:
            return result
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])  # (N, V)
        row_reqs = [req for _, req in sample_rows] + [req for _, req, _ in prompt_rows]
        bad = (~torch.isfinite(logits).all(dim=-1)).nonzero().flatten().tolist()
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
