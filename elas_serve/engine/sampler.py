"""Sampler: next tokens and log-probs from a batch of float32 logits, one row per request.

Order of logit processing (as vLLM): logit_bias, min_tokens (EOS/stop ids masked), repetition /
frequency / presence penalties, then temperature, min_p, top_k, top_p. `temperature == 0` is greedy.
top_p keeps the smallest set of most likely tokens reaching p: a token is dropped once the more
likely ones reach p. Log-probs are of the raw model distribution (vLLM's default "raw_logprobs").

`sample` takes the whole batch in a number of tensor ops that does not grow with it:
- logit_bias and min_tokens masking: one `index_add_` / `index_fill_` over flat `row * V + token`
  ids; penalties over the nonzeros of the (prompt, output) token-count matrix, kept in coordinate
  form (`torch.unique` of flat ids, with counts), so they cost O(ids), not O(B * V);
- temperature, softmax and min_p over the sampled rows; top_k / top_p from one `topk` whose
  width covers every row's top_k: the rows whose kept set turns out wider than it are redone
  with a wider one, at last with one full sort (exact: the kept set is a prefix of the sorted row);
- a greedy-only batch takes argmax after the penalties, no softmax.
`sample_ref` is the per-row implementation it replaces, kept as the oracle; the tests hold the two
to the same filtered probabilities and tokens.

NOTE: batch independence of seeded requests: each seeded request draws its noise from its own
`torch.Generator` (exponential race: argmax(p / E), E ~ Exp(1) over the whole vocabulary, which
samples from p), so the same seed gives the same tokens whatever else shares the batch, and the
same tokens as `sample_ref`. Unseeded rows share one draw of one uniform per row from their
(shared) generator and invert the CDF of their kept tokens: the same distribution, V times fewer
random numbers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
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


def _flat_ids(lists: list[list[int]], rows: list[int], vocab: int, device: torch.device,
              what: str | None = None) -> torch.Tensor:
    """`row * vocab + token` for every token of `lists[j]` (row `rows[j]`), one int64 tensor.
    With `what`, ids outside [0, vocab) raise (they would land in another row)."""
    ids = torch.tensor(list(itertools.chain.from_iterable(lists)), dtype=torch.long)
    if what is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{what}: token id outside the vocabulary [0, {vocab})")
    row = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), torch.tensor([len(x) for x in lists]))
    return (row * vocab + ids).to(device)


def _per_row(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype).to(like.device)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Logit bias, min_tokens masking and repetition/frequency/presence penalties, in place."""
    num_rows, vocab = logits.shape
    assert logits.is_contiguous(), "flat indexing needs contiguous logits"
    flat, dev = logits.view(-1), logits.device
    bias = [i for i, r in enumerate(rows) if r.params.logit_bias]
    if bias:
        maps = [rows[i].params.logit_bias for i in bias]
        flat.index_add_(0, _flat_ids([list(m) for m in maps], bias, vocab, dev, "logit_bias"),
                        _per_row([v for m in maps for v in m.values()], logits))
    blocked = [i for i, r in enumerate(rows) if r.stop_ids_blocked]
    if blocked:
        flat.index_fill_(0, _flat_ids([rows[i].stop_ids_blocked for i in blocked], blocked, vocab, dev,
                                      "stop_token_ids"), -float("inf"))
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep:
        seen = torch.unique(_flat_ids([rows[i].prompt_token_ids + rows[i].output_token_ids for i in rep],
                                      rep, vocab, dev))
        penalty = _per_row([r.params.repetition_penalty for r in rows], logits)[seen // vocab]
        vals = flat[seen]
        flat[seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
    freq = [i for i, r in enumerate(rows)
            if (r.params.frequency_penalty or r.params.presence_penalty) and r.output_token_ids]
    if freq:
        ids, counts = torch.unique(_flat_ids([rows[i].output_token_ids for i in freq], freq, vocab, dev),
                                   return_counts=True)
        row = ids // vocab
        fp = _per_row([r.params.frequency_penalty for r in rows], logits)[row]
        pp = _per_row([r.params.presence_penalty for r in rows], logits)[row]
        flat[ids] = flat[ids] - (fp * counts.to(logits.dtype) + pp)
    return logits


def _probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, softmax and min_p of rows (n, V) -> probabilities (n, V); `logits` is divided in place."""
    probs = torch.softmax(logits.div_(_per_row([p.temperature for p in params], logits)[:, None]), dim=-1)
    if any(p.min_p > 0 for p in params):
        floor = probs.amax(-1, keepdim=True) * _per_row([p.min_p for p in params], probs)[:, None]
        probs.masked_fill_(probs < floor, 0.0)
    return probs


def _widths(vocab: int) -> list[int]:
    """Candidate widths a row may try, narrowest first; the last is a full sort."""
    return [w for w in (64, 1024) if w <= vocab // 2] + [vocab]


def _top_k_top_p(probs: torch.Tensor, params: list[SamplingParams]
                 ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(rows, weights (m, K), token ids (m, K)) groups: each row's kept tokens, most likely first,
    with the probabilities `_filter` keeps (zeros for dropped candidates).

    A row starts at the narrowest width past its top_k (so a run of ties at the k-th value is seen
    to end) and moves on to the next width while its kept set reaches the end of its candidates."""
    vocab = probs.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    widths = _widths(vocab)
    first = [next(s for s, w in enumerate(widths) if w > k or w == vocab) for k in top_k]
    todo: list[int] = []
    for stage, width in enumerate(widths):
        todo = sorted(todo + [j for j, s in enumerate(first) if s == stage])
        if not todo:
            continue
        sub = probs if len(todo) == probs.shape[0] else probs[todo]
        vals, ids = sub.topk(width, dim=-1) if width < vocab else sub.sort(dim=-1, descending=True)
        k = torch.tensor([top_k[j] for j in todo], device=probs.device)
        has_k = k > 0
        kth = torch.where(has_k, vals.gather(1, (k - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)  # (m,)
        w = vals.masked_fill(vals < kth[:, None], 0.0)
        cum = w.cumsum(-1)  # NOTE: the prefix of the whole sorted row's cumsum, bit for bit
        top_p = _per_row([params[j].top_p for j in todo], probs)
        # mass the top_p threshold is taken of: the whole row's, unless top_k bounds it to candidates
        # NOTE: CPU cumsum accumulates in float64; so does this sum, so the threshold matches `_filter`
        total = cum[:, -1]
        if width < vocab and any(params[j].top_p < 1 and not top_k[j] for j in todo):
            total = torch.where(has_k, total, sub.sum(-1, dtype=torch.float64).to(probs.dtype))
        before = torch.cat((cum.new_zeros(len(todo), 1), cum[:, :-1]), dim=1)  # mass of the more likely
        drop = (before >= (top_p * total)[:, None]) & (top_p < 1)[:, None]
        w.masked_fill_(drop, 0.0)
        if width == vocab:
            yield todo, w, ids
            return
        # the kept set fits when its end is seen: top_k's tie run and top_p's cut both inside
        fits = ((~has_k) | (vals[:, -1] < kth)) & ((top_p == 1) | drop[:, -1])
        fit = fits.tolist()
        done = [j for j, f in enumerate(fit) if f]
        if done:
            yield [todo[j] for j in done], w[done], ids[done]
        todo = [todo[j] for j, f in enumerate(fit) if not f]


def _draw(weights: torch.Tensor, ids: torch.Tensor | None, rows: list[SamplingRow], vocab: int) -> torch.Tensor:
    """One token per row of `weights` (m, K) over token ids `ids` (m, K) (None: the vocabulary)."""
    dev = weights.device
    out = torch.empty(len(rows), dtype=torch.long, device=dev)
    seeded = [j for j, r in enumerate(rows) if r.params.seed is not None and r.generator is not None]
    if seeded:
        noise = torch.stack([torch.empty(vocab, device=dev).exponential_(generator=rows[j].generator)
                             for j in seeded])  # (s, V): the draws `sample_ref` makes
        w = weights[seeded]
        if ids is not None:
            noise = noise.gather(1, ids[seeded])
        best = (w / noise).argmax(-1)
        out[seeded] = best if ids is None else ids[seeded].gather(1, best[:, None]).squeeze(1)
    shared: dict[int, list[int]] = {}  # generator -> rows (the runner gives all unseeded rows one)
    for j, r in enumerate(rows):
        if not (r.params.seed is not None and r.generator is not None):
            shared.setdefault(id(r.generator), []).append(j)
    if shared:
        order = [j for js in shared.values() for j in js]
        u = torch.cat([1 - torch.rand(len(js), device=dev, generator=rows[js[0]].generator)
                       for js in shared.values()])  # (0, 1]
        cdf = weights[order].cumsum(-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=cdf.shape[1] - 1)
        out[order] = pick.squeeze(1) if ids is None else ids[order].gather(1, pick).squeeze(1)
    return out


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """One token per row of `logits` (B, V); `logits` is modified."""
    logits = apply_penalties(logits, rows)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    if len(greedy) == len(rows):
        return logits.argmax(-1).tolist()
    dev, vocab = logits.device, logits.shape[1]
    tokens = torch.empty(len(rows), dtype=torch.long, device=dev)
    if greedy:
        g = torch.tensor(greedy, device=dev)
        tokens[g] = logits[g].argmax(-1)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    params = [rows[i].params for i in sampled]
    probs = _probs(logits[sampled] if greedy else logits, params)  # (n, V)
    limited = [j for j, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1]
    free = [j for j, p in enumerate(params) if not (0 < p.top_k < vocab or p.top_p < 1)]
    groups = [(free, probs[free] if limited else probs, None)] if free else []
    if limited:
        groups += [([limited[j] for j in js], w, ids)
                   for js, w, ids in _top_k_top_p(probs[limited] if free else probs, [params[j] for j in limited])]
    for js, w, ids in groups:
        tokens[torch.tensor([sampled[j] for j in js], device=dev)] = _draw(w, ids, [rows[sampled[j]] for j in js],
                                                                           vocab)
    return tokens.tolist()


def token_logprobs(logprobs: torch.Tensor, token_ids: list[int], num_top: list[int]
                   ) -> list[TokenLogprob]:
    """Log-prob, rank and top-`k` alternatives of `token_ids[i]` under row i of `logprobs` (N, V).

    One gather, one batched rank count and one topk; four host transfers whatever N."""
    if not token_ids:
        return []
    ids = torch.tensor(token_ids, device=logprobs.device)
    chosen = logprobs.gather(1, ids[:, None]).squeeze(1)  # (N,)
    ranks = ((logprobs > chosen[:, None]).sum(1) + 1).tolist()
    k = max(num_top)
    top_ids, top_vals = [], []
    if k > 0:
        vals, idx = logprobs.topk(k, dim=-1)
        top_ids, top_vals = idx.tolist(), vals.tolist()
    return [TokenLogprob(tid, lp, rank, list(zip(top_ids[i][:n], top_vals[i][:n])) if n else [])
            for i, (tid, lp, rank, n) in enumerate(zip(token_ids, chosen.tolist(), ranks, num_top))]


# ---------------------------------------------------------------- per-row reference (the oracle)

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
