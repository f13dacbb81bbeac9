"""Sampler arithmetic against hand-computed values.

Run: python -m pytest tests/test_sampler.py -v
"""

from __future__ import annotations

import pytest
import torch

from elas_serve.engine.sampler import SamplingRow, _filter, apply_penalties, sample, token_logprobs
from elas_serve.sampling_params import SamplingParams


def row(params: SamplingParams, prompt=(), output=(), blocked=(), seed=None) -> SamplingRow:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(params, list(prompt), list(output), list(blocked), gen)


def test_penalties_and_bias_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                       logit_bias={4: 1.5})
    out = apply_penalties(logits.clone(), [row(p, prompt=[0], output=[1, 1, 3], blocked=[2])])
    # repetition: seen tokens 0, 1, 3 (prompt + output): positive / 2, negative * 2
    # frequency/presence on output counts {1: 2, 3: 1}; bias +1.5 on 4; token 2 blocked (min_tokens)
    expected = torch.tensor([[1.0, -2.0 - 0.5 * 2 - 0.25, -float("inf"), 1.5 - 0.5 - 0.25, 1.5]])
    assert torch.equal(out, expected)


def test_filters_by_hand():
    logits = torch.log(torch.tensor([0.05, 0.15, 0.3, 0.5]))
    probs = _filter(logits.clone(), SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(probs, torch.tensor([0, 0, 0.3, 0.5]))
    probs = _filter(logits.clone(), SamplingParams(temperature=1.0, top_p=0.75))  # 0.5 + 0.3 >= 0.75
    assert torch.allclose(probs, torch.tensor([0, 0, 0.3, 0.5]))
    probs = _filter(logits.clone(), SamplingParams(temperature=1.0, top_p=0.5))  # 0.5 alone suffices
    assert torch.allclose(probs, torch.tensor([0, 0, 0, 0.5]))
    probs = _filter(logits.clone(), SamplingParams(temperature=1.0, min_p=0.5))  # keep p >= 0.25
    assert torch.allclose(probs, torch.tensor([0, 0, 0.3, 0.5]))
    hot = _filter(logits.clone(), SamplingParams(temperature=2.0))
    expected = torch.softmax(logits / 2.0, -1)
    assert torch.allclose(hot, expected)


def test_sampling_follows_the_distribution_and_the_seed():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7]]))
    p = SamplingParams(temperature=1.0, seed=3)
    gen = torch.Generator().manual_seed(3)
    draws = [sample(logits.clone(), [SamplingRow(p, [], [], [], gen)])[0] for _ in range(3000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / 3000
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.7]), atol=0.03)
    again = [sample(logits.clone(), [row(p, seed=3)])[0] for _ in range(5)]
    assert len(set(again)) == 1  # a fresh generator with the same seed draws the same first token
    assert sample(torch.tensor([[0.0, 5.0, 1.0]]), [row(SamplingParams(temperature=0))]) == [1]


def test_token_logprobs_rank_and_top():
    logprobs = torch.log_softmax(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), -1)
    (lp,) = token_logprobs(logprobs, [2], [2])
    assert lp.rank == 2 and lp.logprob == pytest.approx(logprobs[0, 2].item())
    assert [t for t, _ in lp.top] == [1, 2]
    (none,) = token_logprobs(logprobs, [0], [0])
    assert none.top == [] and none.rank == 3
