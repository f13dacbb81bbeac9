"""lm-evaluation-harness `local-completions` against a live server, on task files shipped in
tests/lm_eval_tasks/ (local JSON, no hub download), with the server's own remote tokenizer.

The loglikelihoods lm-eval computes from our responses are checked against the model itself.
Run: python -m pytest tests/test_lm_eval.py -v
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from authors_ckpt import Variant, write_checkpoint
from server_utils import MODEL_NAME, ServerThread

TASKS = Path(__file__).parent / "lm_eval_tasks"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer_file):
    path = tmp_path_factory.mktemp("lmeval_ckpt")
    write_checkpoint(path, Variant("lmeval", vocab=320, extra_config={"eos_token_id": 0}))
    shutil.copy(tokenizer_file, path / "tokenizer.json")
    with ServerThread(path) as s:
        yield s


def _continuation_loglikelihood(server, context: str, continuation: str) -> float:
    """lm-eval's `_encode_pair` tokenization, scored by a full forward of the model."""
    tok, model = server.llm.tokenizer, server.engine.model
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    with torch.inference_mode():
        logits = model.compute_logits(model(torch.tensor(whole), torch.arange(len(whole))))
    logprobs = torch.log_softmax(logits, -1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def test_lm_eval_local_completions(server, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(TASKS)  # the task files name their data relative to this folder
    before = server.metrics()
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": MODEL_NAME, "base_url": f"{server.url}/v1/completions", "tokenizer_backend": "remote",
                    "num_concurrent": 1, "max_retries": 1, "tokenized_requests": True, "max_length": 2048},
        tasks=["elas_austen_mc", "elas_austen_gen", "elas_austen_ppl"],
        task_manager=TaskManager(include_path=str(TASKS)), log_samples=True)
    res = results["results"]
    assert 0 <= res["elas_austen_mc"]["acc,none"] <= 1
    assert 0 <= res["elas_austen_gen"]["exact_match,none"] <= 1
    assert math.isfinite(res["elas_austen_ppl"]["word_perplexity,none"])
    assert res["elas_austen_ppl"]["bits_per_byte,none"] > 0

    mc = results["samples"]["elas_austen_mc"]
    assert len(mc) == 4
    for sample in mc:
        for (context, continuation), (ll, _greedy) in zip(
                [a for a in sample["arguments"]], [r[0] for r in sample["resps"]]):
            assert ll == pytest.approx(_continuation_loglikelihood(server, context, continuation), abs=2e-3)
    gen = results["samples"]["elas_austen_gen"]
    assert len(gen) == 3 and all(isinstance(s["resps"][0][0], str) for s in gen)
    for s in gen:  # no stop string leaks into a generation
        assert not any(stop in s["resps"][0][0] for stop in ("\n", ".", ";", "!", "?"))

    served = server.metrics()[f'elas:request_success_total{{finished_reason="length",model_name="{MODEL_NAME}"}}']
    assert served > before.get(f'elas:request_success_total{{finished_reason="length",model_name="{MODEL_NAME}"}}', 0)
