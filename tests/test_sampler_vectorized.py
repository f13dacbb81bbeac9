"""The batched sampler against the per-row reference (`sample_ref`), on fresh random logits.

Penalties and filtered probabilities must match bit for bit; tokens exactly for greedy and seeded
rows; unseeded rows (a different, cheaper draw) in distribution.
Run: python -m pytest tests/test_sampler_vectorized.py -v
"""

from __future__ import annotations

import random

import pytest
import torch

from elas_serve.engine import sampler as S
from elas_serve.engine.sampler import SamplingRow, apply_penalties, sample
from elas_serve.engine.sampler_ref import _filter, apply_penalties_ref, sample_ref
from elas_serve.sampling_params import SamplingParams


def random_params(rng: random.Random, vocab: int) -> SamplingParams:
    kind = rng.choice(["greedy", "greedy_k1", "temperature", "top_k", "top_p", "min_p", "all", "wide_k"])
    kw: dict = {"temperature": rng.choice([0.5, 0.7, 1.0, 1.3])}
    if kind == "greedy":
        kw["temperature"] = 0.0
    elif kind == "greedy_k1":
        kw["top_k"] = 1
    elif kind == "top_k":
        kw["top_k"] = rng.choice([2, 5, 40, 200])
    elif kind == "top_p":
        kw["top_p"] = rng.choice([0.3, 0.8, 0.9, 0.95, 0.999])
    elif kind == "min_p":
        kw["min_p"] = rng.choice([0.01, 0.1, 0.5])
    elif kind == "all":
        kw.update(top_k=rng.choice([-1, 0, 3, 50, vocab]), top_p=rng.choice([0.5, 0.9, 1.0]),
                  min_p=rng.choice([0.0, 0.05]))
    elif kind == "wide_k":
        kw.update(top_k=vocab - rng.randint(1, 5), top_p=rng.choice([0.95, 1.0]))
    if rng.random() < 0.4:
        kw.update(repetition_penalty=rng.choice([0.8, 1.0, 1.2, 2.0]), frequency_penalty=rng.choice([0, 0.5, -1.5]),
                  presence_penalty=rng.choice([0, 0.3, -0.7]))
    if rng.random() < 0.3:
        kw["logit_bias"] = {rng.randrange(vocab): rng.uniform(-100, 100) for _ in range(rng.randint(1, 4))}
    if rng.random() < 0.5:
        kw["seed"] = rng.randrange(2 ** 32)
    return SamplingParams(**kw)


def random_rows(rng: random.Random, num_rows: int, vocab: int) -> list[SamplingRow]:
    rows = []
    shared = torch.Generator().manual_seed(rng.randrange(2 ** 32))
    for _ in range(num_rows):
        p = random_params(rng, vocab)
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 30))]
        output = [rng.choice(prompt) if prompt and rng.random() < 0.3 else rng.randrange(vocab)
                  for _ in range(rng.randint(0, 20))]
        blocked = [rng.randrange(vocab) for _ in range(rng.randint(1, 3))] if rng.random() < 0.2 else []
        gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else shared
        rows.append(SamplingRow(p, prompt, output, blocked, gen))
    return rows


def fresh(rows: list[SamplingRow]) -> list[SamplingRow]:
    """The same rows with seeded generators reset to their seed (unseeded ones share a new one)."""
    shared = torch.Generator().manual_seed(0)
    return [SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, r.stop_ids_blocked,
                        torch.Generator().manual_seed(r.params.seed) if r.params.seed is not None else shared)
            for r in rows]


def make_logits(style: str, num_rows: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    if style == "flat":  # nuclei of thousands of tokens: the widening path and the full sort
        return torch.randn(num_rows, vocab, generator=g)
    if style == "ties":  # few distinct values: top_k tie runs longer than the candidate width
        return (torch.randn(num_rows, vocab, generator=g) * 2).round()
    if style == "fine_ties":  # logits on a 1/16 grid: runs of equal probabilities at most cuts
        return (torch.randn(num_rows, vocab, generator=g) * 16).round() / 16
    logits = torch.randn(num_rows, vocab, generator=g) * 2  # peaked, LM-like: a few likely tokens
    boost = torch.randint(0, vocab, (num_rows, 8), generator=g)
    return logits.scatter_add(1, boost, torch.rand(num_rows, 8, generator=g) * 8 + 4)


def dense_filtered(logits: torch.Tensor, rows: list[SamplingRow]) -> dict[int, torch.Tensor]:
    """What the batched path keeps for each sampled row, as dense (V,) probabilities."""
    vocab = logits.shape[1]
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    params = [rows[i].params for i in sampled]
    probs = S._probs(logits[sampled].clone(), params)
    out = {i: probs[j] for j, i in enumerate(sampled)
           if not (0 < params[j].top_k < vocab or params[j].top_p < 1)}
    limited = [j for j, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1]
    if limited:
        for js, w, ids in S._top_k_top_p(probs, [params[j] for j in limited], limited):
            dense = w.clone() if ids is None else torch.zeros(len(js), vocab).scatter_(1, ids, w)
            out.update({sampled[limited[j]]: dense[n] for n, j in enumerate(js)})
    return out


@pytest.mark.parametrize("style,vocab,seed", [("peaked", 3000, 0), ("flat", 3000, 1), ("peaked", 97, 2),
                                              ("ties", 2000, 3), ("flat", 40, 4), ("fine_ties", 3000, 7)])
def test_batched_equals_per_row_reference(style, vocab, seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    rows = random_rows(rng, 96, vocab)
    logits = make_logits(style, len(rows), vocab, g)

    ours, ref = apply_penalties(logits.clone(), rows), apply_penalties_ref(logits.clone(), rows)
    assert torch.equal(ours, ref)
    filtered = dense_filtered(ours, rows)
    for i, probs in filtered.items():
        expected = _filter(ref[i].clone(), rows[i].params)
        assert torch.equal(probs, expected), (i, rows[i].params)

    tokens, expected = sample(logits.clone(), fresh(rows)), sample_ref(logits.clone(), fresh(rows))
    for i, r in enumerate(rows):
        if r.params.greedy or r.params.seed is not None:
            assert tokens[i] == expected[i], (i, r.params)
        else:  # a different draw, but always one of the kept tokens
            assert filtered[i][tokens[i]] > 0, (i, r.params)


def test_batched_filters_by_hand():
    """The cases of test_sampler.test_filters_by_hand, as one batch through the batched path."""
    logits = torch.log(torch.tensor([0.05, 0.15, 0.3, 0.5])).expand(5, -1).clone()
    params = [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.75),
              SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=1.0, min_p=0.5),
              SamplingParams(temperature=2.0)]
    got = dense_filtered(logits, [SamplingRow(p, [], [], [], None) for p in params])
    expected = [[0, 0, 0.3, 0.5], [0, 0, 0.3, 0.5], [0, 0, 0, 0.5], [0, 0, 0.3, 0.5],
                torch.softmax(logits[0] / 2.0, -1).tolist()]
    for i, e in enumerate(expected):
        assert torch.allclose(got[i], torch.tensor(e)), (params[i], got[i])


def test_unseeded_rows_follow_the_filtered_distribution():
    """4000 copies of each row in one batch: one uniform each from the shared generator."""
    logits = torch.log(torch.tensor([0.05, 0.1, 0.15, 0.2, 0.22, 0.28]))
    shared = torch.Generator().manual_seed(1)
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4),
                   SamplingParams(temperature=1.0, top_p=0.6), SamplingParams(temperature=1.0, min_p=0.5)):
        rows = [SamplingRow(params, [], [], [], shared) for _ in range(4000)]
        tokens = sample(logits.expand(4000, -1).clone(), rows)
        freq = torch.bincount(torch.tensor(tokens), minlength=6).float() / 4000
        kept = _filter(logits.clone(), params)
        assert torch.allclose(freq, kept / kept.sum(), atol=0.03), (params, freq)


def test_wide_rows_draw_in_two_levels_from_the_filtered_distribution():
    """V = 4096: the blockwise inverse CDF; min_p leaves zeros inside blocks, never drawn."""
    g = torch.Generator().manual_seed(8)
    vocab, n = 4096, 6000
    base = torch.randn(vocab, generator=g) * 0.5
    base[[5, 700, 2047, 4095]] += torch.tensor([4.0, 3.5, 3.0, 2.5])
    shared = torch.Generator().manual_seed(2)
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, min_p=0.02)):
        kept = _filter(base.clone(), params)
        kept = kept / kept.sum()
        tokens = torch.tensor(sample(base.expand(n, -1).clone(), [SamplingRow(params, [], [], [], shared)] * n))
        assert bool((kept[tokens] > 0).all())
        buckets = torch.tensor([5, 700, 2047, 4095])
        freq = (tokens[:, None] == buckets).float().mean(0)
        assert torch.allclose(freq, kept[buckets], atol=0.02), (params, freq, kept[buckets])
        assert abs((tokens < 2048).float().mean() - kept[:2048].sum()) < 0.02


def test_float64_redo_of_the_top_p_mass_changes_nothing(monkeypatch):
    """Every top_p row redoes its mass in float64 (tolerance 1): still the reference's tokens."""
    monkeypatch.setattr(S, "SUM_TOLERANCE", 1.0)
    rng = random.Random(6)
    rows = random_rows(rng, 64, 3000)
    logits = make_logits("peaked", 64, 3000, torch.Generator().manual_seed(6))
    pen = apply_penalties(logits.clone(), rows)
    for i, probs in dense_filtered(pen, rows).items():
        assert torch.equal(probs, _filter(pen[i].clone(), rows[i].params))


def test_seeded_rows_do_not_depend_on_the_batch():
    rng = random.Random(5)
    g = torch.Generator().manual_seed(5)
    vocab = 500
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=1234)
    logits = make_logits("peaked", 1, vocab, g)
    alone, crowded = [], []
    gen_a, gen_b = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1234)
    for _ in range(5):
        others = random_rows(rng, 20, vocab)
        alone += sample(logits.clone(), [SamplingRow(params, [], [], [], gen_a)])
        batch = torch.cat([make_logits("flat", 20, vocab, g), logits])
        crowded += sample(batch, others + [SamplingRow(params, [], [], [], gen_b)])[-1:]
    assert alone == crowded


def test_greedy_only_batch_takes_the_argmax_without_softmax(monkeypatch):
    def no_probs(*args):
        raise AssertionError("a greedy-only batch computed probabilities")

    monkeypatch.setattr(S, "_probs", no_probs)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 100, generator=g)
    rows = [SamplingRow(SamplingParams(temperature=0, repetition_penalty=1.5, logit_bias={3: 5.0}), [1, 2], [3], [],
                        None) for _ in range(8)]
    assert sample(logits.clone(), rows) == apply_penalties_ref(logits.clone(), rows).argmax(-1).tolist()


def test_out_of_vocabulary_ids_raise():
    rows = [SamplingRow(SamplingParams(logit_bias={100: 1.0}), [], [], [], None)]
    with pytest.raises(ValueError, match="logit_bias: token id outside the vocabulary"):
        sample(torch.randn(1, 100), rows)
    rows = [SamplingRow(SamplingParams(), [], [], [-1], None)]
    with pytest.raises(ValueError, match="stop_token_ids"):
        sample(torch.randn(1, 100), rows)


def test_token_logprobs_batched_equals_per_row():
    g = torch.Generator().manual_seed(3)
    logprobs = torch.log_softmax(torch.randn(12, 300, generator=g), -1)
    ids = torch.randint(0, 300, (12,), generator=g).tolist()
    num_top = [0, 1, 5, 20, 3, 0, 2, 7, 20, 1, 0, 4]
    for i, lp in enumerate(S.token_logprobs(logprobs, ids, num_top)):
        row = logprobs[i]
        assert lp.token_id == ids[i] and lp.logprob == row[ids[i]].item()
        assert lp.rank == int((row > row[ids[i]]).sum()) + 1
        vals, top = row.topk(num_top[i]) if num_top[i] else (torch.tensor([]), torch.tensor([], dtype=torch.long))
        assert lp.top == list(zip(top.tolist(), vals.tolist()))
    assert S.token_logprobs(logprobs[:0], [], []) == []


def wide_rows(rng: random.Random, num_rows: int) -> list[SamplingRow]:
    """Sampled rows whose top_p sets are wide on flat logits: every row takes `_threshold` (mixed
    with min_p and top_k, half of them seeded)."""
    rows = []
    for i in range(num_rows):
        kw: dict = {"temperature": rng.choice([0.6, 0.8, 1.0, 1.5]), "top_p": rng.uniform(0.5, 0.999)}
        if i % 4 == 1:
            kw["min_p"] = rng.choice([0.001, 0.02])
        if i % 4 == 2:
            kw["top_k"] = rng.choice([100, 5000, 20000])
        if i % 2:
            kw["seed"] = rng.randrange(2 ** 32)
        p = SamplingParams(**kw)
        rows.append(SamplingRow(p, [], [], [], torch.Generator().manual_seed(p.seed) if p.seed is not None else None))
    return rows


def count_full_sorts(monkeypatch) -> list[int]:
    """Rows `_threshold` hands to `_full_sort`, call by call."""
    calls: list[int] = []
    real = S._full_sort

    def counted(w, top_p):
        calls.append(len(w))
        return real(w, top_p)

    monkeypatch.setattr(S, "_full_sort", counted)
    return calls


def assert_like_reference(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Filtered probabilities bit for bit, greedy and seeded tokens equal."""
    for i, probs in dense_filtered(logits, rows).items():
        assert torch.equal(probs, _filter(logits[i].clone(), rows[i].params)), (i, rows[i].params)
    tokens, expected = sample(logits.clone(), fresh(rows)), sample_ref(logits.clone(), fresh(rows))
    for i, r in enumerate(rows):
        if r.params.greedy or r.params.seed is not None:
            assert tokens[i] == expected[i], (i, r.params)


def test_threshold_path_on_flat_rows_is_exact_without_the_full_sort(monkeypatch):
    """V = 32768, N(0, 1) logits: top_p sets of thousands of tokens, found by the mass histogram and
    the window, never the fallback sort."""
    sorts = count_full_sorts(monkeypatch)
    rng = random.Random(11)
    rows = wide_rows(rng, 24)
    logits = torch.randn(24, 32768, generator=torch.Generator().manual_seed(11))
    assert_like_reference(logits, rows)
    assert sorts == [], sorts


@pytest.mark.parametrize("vocab", [3000, 32768])
def test_cut_inside_a_run_of_equal_values_follows_the_reference(monkeypatch, vocab):
    """Each row holds a run of vocab / 8 equal probabilities and its top_p cut falls in the middle of
    it: which of them are kept is the reference's sort's choice, so those rows take the full sort,
    and only those."""
    sorts = count_full_sorts(monkeypatch)
    rng = random.Random(vocab)
    g = torch.Generator().manual_seed(vocab)
    rows = wide_rows(rng, 16)
    logits = torch.randn(len(rows), vocab, generator=g)
    for i, r in enumerate(rows):
        r.params.top_k, r.params.min_p = 0, 0.0
        copies = torch.randperm(vocab, generator=g)[: vocab // 8]
        logits[i, copies] = float(logits[i].quantile(rng.uniform(0.3, 0.9)))
        probs = torch.softmax(logits[i] / r.params.temperature, -1)
        v = probs[copies[0]]
        r.params.top_p = float((probs[probs > v].sum() + v * len(copies) / 2) / probs.sum())
        kept = _filter(logits[i].clone(), r.params)
        assert 0 < int((kept[copies] > 0).sum()) < len(copies), i  # the run is split by the cut
    assert_like_reference(logits, rows)
    assert sorts == [len(rows)] * 2, sorts  # dense_filtered, then sample


def test_ties_everywhere_and_forced_fallback_stay_exact(monkeypatch):
    """Few distinct logits (ties at every cut) on wide rows; then every row forced to the full sort
    (EXACT_FLOOR at 1.0: no window qualifies): the reference's result either way."""
    rng = random.Random(12)
    g = torch.Generator().manual_seed(12)
    rows = wide_rows(rng, 24)
    for style in ("ties", "fine_ties"):
        assert_like_reference(make_logits(style, len(rows), 4096, g), rows)
    sorts = count_full_sorts(monkeypatch)
    monkeypatch.setattr(S, "EXACT_FLOOR", 1.0)
    logits = make_logits("flat", len(rows), 4096, g)
    assert_like_reference(logits, rows)
    assert sorts == [len(rows)] * 2, sorts  # dense_filtered, then sample


def test_peaked_rows_with_wide_tails_mix_both_paths(monkeypatch):
    """Peaked logits at V = 32768, with top_p near 1: the 64 candidates for some rows, `_threshold`
    for the others (with values down to the tail), all the reference's."""
    rng = random.Random(13)
    rows = wide_rows(rng, 32)
    for r in rows:
        r.params.top_p = rng.choice([0.9, 0.99, 0.999])
    assert_like_reference(make_logits("peaked", len(rows), 32768, torch.Generator().manual_seed(13)), rows)
