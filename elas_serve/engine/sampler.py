"""Sampler: next tokens and log-probs from a batch of float32 logits, one row per request.

Order of logit processing (as vLLM): logit_bias, min_tokens (EOS/stop ids masked), repetition /
frequency / presence penalties, then temperature, min_p, top_k, top_p. `temperature == 0` is greedy.
Log-probs are of the raw model distribution (vLLM's default "raw_logprobs").

NOTE: batch independence of seeded requests: each seeded request draws its noise from its own
`torch.Generator` (exponential race: argmax(p / E), E ~ Exp(1), which samples from p), so the
same seed gives the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from elas_serve.sampling_params import SamplingParams

from .request import TokenLogprob


@dataclass(slots=True)
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    stop_ids_blocked: list[int]  # EOS + stop_token_ids while below min_tokens, else []
    generator: torch.Generator | None  # per-request when seeded, else the shared one


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Logit bias, min_tokens masking and repetition/frequency/presence penalties, in place."""
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


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """One token per row of `logits` (B, V); `logits` is modified."""
    logits = apply_penalties(logits, rows)
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


def token_logprobs(logprobs: torch.Tensor, token_ids: list[int], num_top: list[int]
                   ) -> list[TokenLogprob]:
    """Log-prob, rank and top-`k` alternatives of `token_ids[i]` under row i of `logprobs` (N, V)."""
    if not token_ids:
        return []
    ids = torch.tensor(token_ids, device=logprobs.device)
    chosen = logprobs.gather(1, ids[:, None]).squeeze(1)  # (N,)
    ranks = ((logprobs > chosen[:, None]).sum(1) + 1).tolist()
    k = max(num_top)
    top_vals, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (None, None)
    result = []
    for i, (tid, lp) in enumerate(zip(token_ids, chosen.tolist())):
        top = [] if k == 0 else list(zip(top_ids[i, :num_top[i]].tolist(), top_vals[i, :num_top[i]].tolist()))
        result.append(TokenLogprob(tid, lp, ranks[i], top))
    return result
