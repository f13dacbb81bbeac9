"""Sampler: next tokens and log-probs from a batch of float32 logits, one row per request.

Order of logit processing (as vLLM): logit_bias, min_tokens (EOS/stop ids masked), repetition /
frequency / presence penalties, then temperature, min_p, top_k, top_p. `temperature == 0` is greedy.
top_p keeps the smallest set of most likely tokens reaching p: a token is dropped once the more
likely ones reach p. Log-probs are of the raw model distribution (vLLM's default "raw_logprobs").

`sample` takes the whole batch in a number of tensor ops that does not grow with it:
- logit_bias and min_tokens: one `index_add_` / `index_fill_` over flat `row * V + token` ids;
  penalties over the nonzeros of the (prompt, output) token-count matrix in coordinate form
  (`torch.unique` of flat ids, with counts): O(ids), not O(B * V);
- temperature, softmax and min_p over the sampled rows; then top_k / top_p on one of two paths:
  * a row whose kept set can fit 64 tokens (its top_p mass over its largest probability, or its
    top_k, says so) ranks its 64 most likely candidates (`_topk`, in two levels) and is done if the
    kept set ends inside them. Exact: the kept set is a prefix of the sorted row and the
    candidates' cumsum is that of the sorted row;
  * every other row (flat rows, sets of thousands of tokens) goes to `_threshold`: a mass histogram
    by value bucket finds the bucket where the cut falls, that bucket's few hundred tokens are
    sorted, and the kept set is {p >= the last kept value}: a fixed number of passes over (m, V)
    instead of a sort of the row. Exact too: float64 sums of the values involved are exact, and a
    row falls back to a full sort (`_full_sort`, the oracle's own rule) when a premise fails, which
    includes a cut inside a run of equal probabilities (the oracle keeps those its unstable sort
    puts first: only the same sort of the same values reproduces that);
- a greedy-only batch takes argmax after the penalties, no softmax.
`sampler_ref.sample_ref` is the per-row implementation it replaced, kept as the oracle: the
tests hold the two to the same penalized logits, filtered probabilities and (greedy, seeded) tokens.

NOTE: batch independence of seeded requests: each seeded request draws its noise from its own
`torch.Generator` (exponential race: argmax(p / E), E ~ Exp(1) over the whole vocabulary, which
samples from p), so the same seed gives the same tokens whatever else shares the batch, and the
same tokens as `sample_ref`. Unseeded rows share one draw of one uniform per row from their
(shared) generator and invert the CDF of their kept tokens: the same distribution, V times fewer
random numbers.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from elas_serve.sampling_params import SamplingParams

from .request import TokenLogprob
from .sampler_ref import _filter, apply_penalties_ref, sample_ref  # noqa: F401 (the oracle, re-exported)


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
    if sum(map(len, lists)) <= 4096:  # NOTE: a few ids: Python beats half a dozen tensor ops
        if what is not None and not all(0 <= t < vocab for ids in lists for t in ids):
            raise ValueError(f"{what}: token id outside the vocabulary [0, {vocab})")
        return torch.tensor([r * vocab + t for r, ids in zip(rows, lists) for t in ids], dtype=torch.long,
                            device=device)
    ids = torch.tensor(list(itertools.chain.from_iterable(lists)), dtype=torch.long)
    if what is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{what}: token id outside the vocabulary [0, {vocab})")
    row = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), torch.tensor([len(x) for x in lists]))
    return (row * vocab + ids).to(device)


def _rows(t: torch.Tensor, index: list[int]) -> torch.Tensor:
    """Rows `index` of `t`, copied. NOTE: index_select; advanced indexing is several times slower on the CPU."""
    return t.index_select(0, torch.tensor(index, device=t.device))


_SCRATCH = threading.local()  # this thread's row buffer of `_gather`, kept between calls


def _gather(x: torch.Tensor, index: list[int]) -> torch.Tensor:
    """Rows `index` of `x` (m, V), copied into this thread's buffer (valid until the next call).

    NOTE: on the CPU a fresh multi-MB tensor costs its page faults, more than the copy itself;
    the buffer stays mapped. CUDA's caching allocator has no such cost: there this is `_rows`."""
    if x.device.type != "cpu":
        return _rows(x, index)
    need = len(index) * x.shape[1]
    buf = getattr(_SCRATCH, "rows", None)
    if buf is None or buf.numel() < need or buf.dtype != x.dtype:
        buf = _SCRATCH.rows = torch.empty(need, dtype=x.dtype)
    return torch.index_select(x, 0, torch.tensor(index), out=buf[:need].view(len(index), x.shape[1]))


def _per_row(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype).to(like.device)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Logit bias, min_tokens masking and repetition/frequency/presence penalties, in place."""
    vocab = logits.shape[1]
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
        vals = flat.index_select(0, seen)
        flat.index_copy_(0, seen, torch.where(vals > 0, vals / penalty, vals * penalty))
    freq = [i for i, r in enumerate(rows)
            if (r.params.frequency_penalty or r.params.presence_penalty) and r.output_token_ids]
    if freq:
        ids, counts = torch.unique(_flat_ids([rows[i].output_token_ids for i in freq], freq, vocab, dev),
                                   return_counts=True)
        row = ids // vocab
        fp = _per_row([r.params.frequency_penalty for r in rows], logits)[row]
        pp = _per_row([r.params.presence_penalty for r in rows], logits)[row]
        flat.index_copy_(0, ids, flat.index_select(0, ids) - (fp * counts.to(logits.dtype) + pp))
    return logits


def _probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, softmax and min_p of rows (n, V) -> probabilities (n, V); divides `logits` in place."""
    probs = torch.softmax(logits.div_(_per_row([p.temperature for p in params], logits)[:, None]), dim=-1)
    rows = [j for j, p in enumerate(params) if p.min_p > 0]
    if rows:
        sub = probs if len(rows) == len(params) else _rows(probs, rows)
        floor = sub.amax(-1, keepdim=True) * _per_row([params[j].min_p for j in rows], probs)[:, None]
        # NOTE: as masked_fill_(sub < floor, 0): a comparison written to float and multiplied is
        # several times faster than a bool mask on the CPU
        sub.mul_(torch.ge(sub, floor, out=_scratch("min_p", tuple(sub.shape), sub.dtype, sub.device)))
        if sub is not probs:
            probs.index_copy_(0, torch.tensor(rows, device=probs.device), sub)
    return probs


SUM_TOLERANCE = 1e-5  # relative; see `_top_k_top_p`
WIDTHS = (64,)  # candidate widths tried before the threshold path (`_widths`)
BUCKET_SHIFT = 18  # `_threshold`'s buckets: float32 bits >> 18 (exponent and 5 mantissa bits, 1/32 of an octave)
EXACT_FLOOR = 2.0 ** -29  # float32 values >= it sum exactly in float64 (in any order) while the sum stays below 2
WINDOW_MARGIN = 1e-6  # relative: the buckets whose cumulative mass lies this close to the cut form the window


def _widths(vocab: int) -> list[int]:
    """Candidate widths a row may try, narrowest first; a row that fits none goes to `_threshold`."""
    return [w for w in WIDTHS if w <= vocab // 2]


def _scratch(name: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (rows, cols) tensor from this thread's buffer `name`, kept between calls (contents undefined,
    valid until the next call for `name`). NOTE: as `_gather`: on the CPU the page faults of a fresh
    multi-MB tensor cost more than the work done in it."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    need = shape[0] * shape[1]
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.numel() < need or buf.dtype != dtype:
        buf = torch.empty(need, dtype=dtype)
        setattr(_SCRATCH, name, buf)
    return buf[:need].view(shape)


def _full_sort(w: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`_filter`'s top_p on rows (f, V) (after min_p and top_k), its own way: a full sort, whose order
    among equal values is `_filter`'s (the same kernel on the same values); modifies `w`."""
    vals, order = w.sort(dim=-1, descending=True)
    cum = vals.cumsum(-1)
    before = torch.cat((cum.new_zeros(len(w), 1), cum[:, :-1]), dim=1)
    return w.scatter_(1, order, vals.masked_fill_(before >= (top_p * cum[:, -1])[:, None], 0.0))


def _threshold(probs: torch.Tensor, params: list[SamplingParams], at: list[int], top_k: list[int]
               ) -> torch.Tensor:
    """`_filter`'s top_k and top_p for `params[j]` on row `at[j]` of `probs` -> dense weights (m, V),
    in this thread's buffer (valid until the next call): the kept set as a threshold on values.

    top_k: the k-th value (`topk` of the rows with a top_k). top_p keeps a prefix of the row sorted
    descending: the token at sorted position i is kept iff float32(D[i-1]) < cut, D[i] the float64
    running sum of the sorted values (CPU `cumsum` accumulates float32 in float64), cut =
    top_p * float32(D[V-1]). Without the sort:
    1. one histogram of the mass by value bucket (float32 bits >> BUCKET_SHIFT, an `index_add_` in
       float64) locates the bucket(s) where the mass from the top reaches the cut: the window;
    2. the window's tokens (a few hundred in a flat row) are gathered and sorted; the mass above the
       window plus their cumsum is D at each of them, so float32(D) < cut counts the kept ones and
       their last value v: the kept set is {p >= v}.
    Exact, not approximate: values >= EXACT_FLOOR sum exactly in float64 in any order, so D at the
    window is `_filter`'s bit for bit, and a row falls back to `_full_sort` (`_filter`'s own rule)
    when any premise fails: the crossing not inside the window, a window value below EXACT_FLOOR,
    a total whose float32 rounding the float64 error bound leaves open, or a cut inside a run of
    equal values (which of them `_filter` keeps depends on its sort's order among ties)."""
    dev = probs.device
    m, vocab = len(at), probs.shape[1]
    w = _scratch("thr_w", (m, vocab), probs.dtype, dev)
    torch.index_select(probs, 0, torch.tensor(at, device=dev), out=w)
    with_k = [j for j, k in enumerate(top_k) if k]
    if with_k:
        sel = torch.tensor(with_k, device=dev)
        sub = w.index_select(0, sel)
        k = torch.tensor([top_k[j] for j in with_k], device=dev)
        kth = sub.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        w.index_copy_(0, sel, sub.masked_fill_(sub < kth, 0.0))
    top_p = _per_row([p.top_p for p in params], w)
    cutting = top_p < 1
    if not bool(cutting.any()):
        return w
    assert w.dtype == torch.float32, "the buckets are float32 bits"
    # NOTE: probabilities are <= 1.0: buckets up to that of 1.0; all values below EXACT_FLOOR share one
    # (a window there falls back anyway): bucket b is flat id row * nb + b - low
    low, top = (_bits(EXACT_FLOOR) >> BUCKET_SHIFT) - 1, _bits(1.0) >> BUCKET_SHIFT
    nb = top - low + 1
    flat = _scratch("thr_bucket", (m, vocab), torch.int32, dev)
    torch.bitwise_right_shift(w.view(torch.int32), BUCKET_SHIFT, out=flat).clamp_(low, top)
    row0 = torch.arange(m, device=dev, dtype=torch.int32)[:, None] * nb
    flat.add_(row0 - low)
    w64 = _scratch("thr_w64", (m, vocab), torch.float64, dev).copy_(w)
    hist = _scratch("thr_hist", (m, nb), torch.float64, dev).zero_()
    hist.view(-1).index_add_(0, flat.view(-1), w64.view(-1))
    desc = hist.flip(-1).cumsum(-1)  # (m, nb): the mass of the top 1, 2, ... buckets
    total64 = desc[:, -1]
    total = total64.to(w.dtype)
    # NOTE: `_filter`'s total is float32(its running sum); both sums are within (V + nb) half-ulps
    # (2^-53 each below 2) of the exact one: the float32 rounding is certain unless that straddles a tie
    err = (vocab + nb) * 2.0 ** -52
    total_sure = (total64 - err).to(w.dtype) == (total64 + err).to(w.dtype)
    cut = top_p * total
    cut64 = cut.to(torch.float64)[:, None]
    first = (desc < cut64 * (1 - WINDOW_MARGIN)).sum(-1)  # window: desc buckets [first, last]
    last = (desc < cut64 * (1 + WINDOW_MARGIN)).sum(-1).clamp_(max=nb - 1)
    above = torch.where(first > 0, desc.gather(1, (first - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)
    lo, hi = nb - 1 - last, nb - 1 - first  # the window's buckets by value (from `low`)
    lowest = (hist > 0).to(torch.int8).argmax(-1)  # the lowest bucket holding a positive value
    inside = _scratch("thr_in", (m, vocab), torch.bool, dev)  # the window's tokens
    if bool((lo == hi).all()):  # NOTE: the usual case (a cut within WINDOW_MARGIN of a bucket's edge is rare)
        torch.eq(flat, (row0.squeeze(1) + lo.to(torch.int32))[:, None], out=inside)
    else:  # values in [the lowest bucket's floor, the floor of the bucket above the highest)
        floor = torch.where(lo > 0, _from_bits((lo + low) << BUCKET_SHIFT), 0.0)
        ceil = torch.where(hi < nb - 1, _from_bits((hi + low + 1) << BUCKET_SHIFT), float("inf"))
        torch.ge(w, floor[:, None], out=inside).logical_and_(
            torch.lt(w, ceil[:, None], out=_scratch("thr_in2", (m, vocab), torch.bool, dev)))
    at_flat = inside.view(-1).nonzero().squeeze(1)  # NOTE: faster than a 2-D nonzero
    r, c = at_flat // vocab, at_flat % vocab
    count = torch.bincount(r, minlength=m)
    width = max(int(count.max()), 1)
    pos = torch.arange(len(r), device=dev) - (count.cumsum(0) - count)[r]
    vals = torch.full((m, width), -1.0, device=dev, dtype=w.dtype)  # NOTE: padding below any probability
    vals[r, pos] = w[r, c]
    vals = vals.sort(dim=-1, descending=True).values
    vals64 = vals.clamp(min=0).to(torch.float64)
    run = vals64.cumsum(-1)  # exact (see EXACT_FLOOR)
    before = (above[:, None] + (run - vals64)).to(w.dtype)  # float32(D) just before each window token
    kept = ((before < cut[:, None]) & (torch.arange(width, device=dev) < count[:, None])).sum(-1)
    v = vals.gather(1, (kept - 1).clamp(min=0)[:, None]).squeeze(1)  # the last kept value
    after = vals.gather(1, kept.clamp(max=width - 1)[:, None]).squeeze(1)  # the next one in the window
    ok = (total_sure & (kept >= 1)  # the window's first token kept: all above it are
          & (((above + run[:, -1]).to(w.dtype) >= cut) | (lowest >= lo))  # the token after the window dropped
          & ((lo + low) << BUCKET_SHIFT >= _bits(EXACT_FLOOR))
          & ((kept == count) | (after != v)))  # no cut inside a run of equal values
    redo = (cutting & ~ok).nonzero().squeeze(1)
    fallback = _full_sort(w.index_select(0, redo), top_p[redo]) if redo.numel() else None
    # NOTE: the kept set {p >= v} (0: all); a comparison written to float32 (into the bucket ids' buffer,
    # done with) and multiplied is several times faster than a bool mask on the CPU
    w.mul_(torch.ge(w, torch.where(cutting, v, 0.0)[:, None], out=flat.view(w.dtype)))
    if fallback is not None:
        w.index_copy_(0, redo, fallback)
    return w


def _from_bits(b: torch.Tensor) -> torch.Tensor:
    """float32 values of the bit patterns `b` (int)."""
    return b.to(torch.int32).view(torch.float32)


def _bits(x: float) -> int:
    """The bits of float32 `x`, as an int (monotone in x >= 0)."""
    return int(torch.tensor(x, dtype=torch.float32).view(torch.int32))


def _topk(x: torch.Tensor, width: int, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """`x.topk(width)` (sorted values and their columns), in two levels where it pays: the `width`
    blocks of `block` columns with the largest maxima hold the `width` largest values (a block
    without one has its max below all of them), so only width * block candidates are ranked.
    NOTE: values equal to the width-th one may come from other blocks: the same values, other ids."""
    rows, cols = x.shape
    if cols % block or width * block * 4 > cols:
        return x.topk(width, dim=-1)
    blocks = x.view(rows, cols // block, block)
    best = blocks.amax(-1).topk(width, dim=-1, sorted=False).indices  # (m, width)
    cand = blocks.gather(1, best[:, :, None].expand(rows, width, block)).view(rows, width * block)
    vals, pos = cand.topk(width, dim=-1)
    return vals, best.gather(1, pos // block) * block + pos % block


def _top_k_top_p(probs: torch.Tensor, params: list[SamplingParams], at: list[int]
                 ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """For `params[j]` on row `at[j]` of `probs`: (js, weights (m, K), token ids (m, K)) groups,
    each row's kept tokens, most likely first, with the probabilities `_filter` keeps (zeros for
    dropped candidates); token ids None: the weights are dense (m, V), columns the vocabulary.

    A row starts at the narrowest width past its top_k (so a run of ties at the k-th value is seen
    to end) and moves on to the next width while its kept set reaches the end of its candidates, or
    its top_p cut falls inside a run of equal values (the tie order of `topk` is not that of
    `_filter`'s sort); past the last width, `_threshold` (the whole row, dense)."""
    vocab = probs.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    widths = _widths(vocab)
    pending: list[list[int]] = [[] for _ in widths]  # rows waiting for each width
    wide: list[int] = []  # rows for `_threshold`

    def move_on(j: int, stage: int, need: float) -> None:
        # NOTE: only skips widths that cannot hold the row; exactness never depends on it
        s = next((s for s in range(stage, len(widths)) if widths[s] > need), None)
        (wide if s is None else pending[s]).append(j)

    need = [float(k) for k in top_k]
    spread = [j for j, p in enumerate(params) if p.top_p < 1 and not top_k[j]]
    if widths and spread:  # a top_p set needs more tokens than its mass over the most likely one's
        sel = torch.tensor([at[j] for j in spread], device=probs.device)
        mass = probs.sum(-1).index_select(0, sel) * _per_row([params[j].top_p for j in spread], probs)
        # NOTE: routing only (a row sent wide is as exact there); the margin covers float32 rounding
        for j, n in zip(spread, (mass * (1 - 1e-4) / probs.amax(-1).index_select(0, sel)).tolist()):
            need[j] = n
    for j, n in enumerate(need):
        move_on(j, 0, n)
    for stage, width in enumerate(widths):
        todo = sorted(pending[stage])
        if not todo:
            continue
        rows = [at[j] for j in todo]
        # NOTE: a topk over all rows of probs and a pick of its small result beats copying most of them
        sub = probs if len(rows) == probs.shape[0] or 2 * len(rows) >= probs.shape[0] else _rows(probs, rows)
        vals, ids = _topk(sub, width)
        if sub.shape[0] > len(rows):
            vals, ids = _rows(vals, rows), _rows(ids, rows)
        k = torch.tensor([top_k[j] for j in todo], device=probs.device)
        has_k = k > 0
        kth = torch.where(has_k, vals.gather(1, (k - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)  # (m,)
        w = vals.masked_fill(vals < kth[:, None], 0.0)
        cum = w.cumsum(-1)  # NOTE: the prefix of the whole sorted row's cumsum, bit for bit
        top_p = _per_row([params[j].top_p for j in todo], probs)
        total = cum[:, -1]
        before = torch.cat((cum.new_zeros(len(todo), 1), cum[:, :-1]), dim=1)  # mass of the more likely
        if any(params[j].top_p < 1 and not top_k[j] for j in todo):  # top_p of the whole row's mass
            sums = sub.sum(-1)  # (top_k rows: of their candidates')
            total = torch.where(has_k, total, sums if sub.shape[0] == len(rows) else _rows(sums, rows))
            cut = top_p * total
            # NOTE: `_filter` takes the mass from a float64-accumulated cumsum (CPU); a float32 sum is
            # within 1e-6 of it, so only rows with a candidate that close to their cut redo it in float64
            near = ((before - cut[:, None]).abs() <= SUM_TOLERANCE * cut[:, None]).any(-1) & ~has_k
            redo = near.nonzero().squeeze(1)
            if redo.numel():
                exact = _rows(probs, [rows[j] for j in redo.tolist()]).sum(-1, dtype=torch.float64)
                total[redo] = exact.to(total.dtype)
        drop = (before >= (top_p * total)[:, None]) & (top_p < 1)[:, None]
        w.masked_fill_(drop, 0.0)
        # the kept set fits when its end is seen: top_k's tie run and top_p's cut both inside, and
        # the cut not inside a run of equal values (the first dropped candidate below the last kept)
        n = (w > 0).sum(-1)
        last = vals.gather(1, (n - 1).clamp(min=0)[:, None]).squeeze(1)
        first_out = vals.gather(1, n.clamp(max=width - 1)[:, None]).squeeze(1)
        fits = (((~has_k) | (vals[:, -1] < kth)) & ((top_p == 1) | drop[:, -1])
                & ((top_p == 1) | (n == width) | (first_out < last)))
        # a row that does not fit needs at least this many tokens (each further one <= the last candidate)
        needs = width + (top_p * total - cum[:, -1]).clamp(min=0) / vals[:, -1].clamp(min=1e-30)
        done = []
        for j, (f, need) in enumerate(zip(fits.tolist(), needs.tolist())):
            if f:
                done.append(j)
            else:
                move_on(todo[j], stage + 1, need)
        if done:
            yield [todo[j] for j in done], _rows(w, done), _rows(ids, done)
    if wide:
        wide.sort()
        yield wide, _threshold(probs, [params[j] for j in wide], [at[j] for j in wide],
                               [top_k[j] for j in wide]), None


def _seeded(row: SamplingRow) -> bool:
    return row.params.seed is not None and row.generator is not None


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per row of `weights` (m, K), the first column whose running sum reaches `u` (m,) in (0, 1]
    times the row's total: a draw from the weights. Wide rows go in two levels (the sums of
    `chunk`-column blocks, then one block's cumsum): one fast sum instead of a full cumsum."""
    m, width = weights.shape
    if width < 4 * chunk or width % chunk:
        cdf = weights.cumsum(-1)
        return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=width - 1).squeeze(1)
    blocks = weights.view(m, width // chunk, chunk)
    outer = blocks.sum(-1).cumsum(-1)  # (m, blocks)
    target = (u * outer[:, -1])[:, None]
    b = torch.searchsorted(outer, target).clamp_(max=outer.shape[1] - 1)  # (m, 1)
    below = torch.where(b > 0, outer.gather(1, (b - 1).clamp(min=0)), 0.0)
    inner = blocks.gather(1, b[:, :, None].expand(m, 1, chunk)).squeeze(1).cumsum(-1)  # (m, chunk)
    # NOTE: kept inside (0, the block's total], so the pick always lands on a positive weight
    rest = (target - below).clamp(min=torch.finfo(weights.dtype).tiny).minimum(inner[:, -1:])
    return (b * chunk + torch.searchsorted(inner, rest)).squeeze(1)


def _draw(weights: torch.Tensor, ids: torch.Tensor | None, rows: list[SamplingRow], vocab: int,
          at: list[int] | None = None) -> torch.Tensor:
    """One token per row: `rows[j]` draws from row `at[j]` (default j) of `weights` (m, K), whose
    columns are the token ids `ids` (m, K) (None: the vocabulary)."""
    dev = weights.device
    at_t = torch.tensor(range(len(rows)) if at is None else at, device=dev)
    pick = torch.empty(len(rows), dtype=torch.long, device=dev)  # a column of `weights` per row
    seeded = [j for j, r in enumerate(rows) if _seeded(r)]
    if seeded:
        noise = torch.stack([torch.empty(vocab, device=dev).exponential_(generator=rows[j].generator)
                             for j in seeded])  # (s, V): the draws `sample_ref` makes
        src = at_t[torch.tensor(seeded, device=dev)]
        if ids is not None:
            noise = noise.gather(1, ids.index_select(0, src))
        pick[seeded] = torch.div(weights.index_select(0, src), noise, out=noise).argmax(-1)
    shared: dict[int, list[int]] = {}  # generator -> its rows (the runner gives all unseeded rows one)
    for j, r in enumerate(rows):
        if not _seeded(r):
            shared.setdefault(id(r.generator), []).append(j)
    if shared:
        unseeded = [j for js in shared.values() for j in js]
        src = at_t[torch.tensor(unseeded, device=dev)]
        u = torch.ones(weights.shape[0], device=dev)  # NOTE: every row drawn (no row copy), others discarded
        u[src] = torch.cat([1 - torch.rand(len(js), device=dev, generator=rows[js[0]].generator)
                            for js in shared.values()])  # (0, 1]
        pick[unseeded] = _inverse_cdf(weights, u)[src]
    return pick if ids is None else ids.index_select(0, at_t).gather(1, pick[:, None]).squeeze(1)


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """One token per row of `logits` (B, V); `logits` is modified."""
    logits = apply_penalties(logits, rows)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    if len(greedy) == len(rows):
        return logits.argmax(-1).tolist()
    dev, vocab = logits.device, logits.shape[1]
    tokens = torch.empty(len(rows), dtype=torch.long, device=dev)
    if greedy:
        tokens[torch.tensor(greedy, device=dev)] = _gather(logits, greedy).argmax(-1)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    params = [rows[i].params for i in sampled]
    probs = _probs(_gather(logits, sampled) if greedy else logits, params)  # (n, V)
    limited = [j for j, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1]
    free = [j for j, p in enumerate(params) if not (0 < p.top_k < vocab or p.top_p < 1)]
    groups = [(free, probs, None, free)] if free else []  # NOTE: rows of probs, no copy
    if limited:
        groups += [([limited[j] for j in js], w, ids, None)
                   for js, w, ids in _top_k_top_p(probs, [params[j] for j in limited], limited)]
    for js, w, ids, rows_at in groups:
        tokens[torch.tensor([sampled[j] for j in js], device=dev)] = _draw(
            w, ids, [rows[sampled[j]] for j in js], vocab, rows_at)
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
