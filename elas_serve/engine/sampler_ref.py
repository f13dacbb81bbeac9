"""The per-row sampler `sampler.sample` replaced: the oracle its tests compare with.

One row at a time, in the documented order (see `sampler`): logit bias, min_tokens masking,
repetition / frequency / presence penalties, then temperature, min_p, top_k, top_p, and the
exponential race with the row's generator (seeded rows: `sampler.sample` draws the same noise).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from elas_serve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from .sampler import SamplingRow


def apply_penalties_ref(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """`apply_penalties` one row at a time, in place."""
    for i, row in enumerate(rows):
        p = row.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
        if row.stop_ids_blocked:
            logits[i, row.stop_ids_blocked] = -float("inf")
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)),
                                device=logits.device, dtype=torch.long)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and row.output_token_ids:
            out = torch.tensor(row.output_token_ids, device=logits.device, dtype=torch.long)
            counts = torch.zeros(logits.shape[1], device=logits.device).index_add_(
                0, out, torch.ones(len(out), device=logits.device))
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def _filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, min_p, top_k, top_p for one row (V,) -> probabilities."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_k > 0 and params.top_k < probs.shape[-1]:
        kth = probs.topk(params.top_k).values[-1]
        probs = probs.masked_fill(probs < kth, 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cum = sorted_probs.cumsum(-1)
        before = torch.cat((cum.new_zeros(1), cum[:-1]))  # mass of the more likely tokens
        drop = before >= params.top_p * cum[-1]  # keep the smallest set reaching top_p
        probs = probs.scatter(0, order[drop], 0.0)
    return probs


def sample_ref(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """`sample` one row at a time; `logits` is modified."""
    logits = apply_penalties_ref(logits, rows)
    greedy = logits.argmax(-1).tolist()
    tokens = []
    for i, row in enumerate(rows):
        if row.params.greedy:
            tokens.append(greedy[i])
            continue
        probs = _filter(logits[i], row.params)
        noise = torch.empty_like(probs).exponential_(generator=row.generator)
        tokens.append(int((probs / noise).argmax()))
    return tokens
