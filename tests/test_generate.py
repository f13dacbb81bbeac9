"""Offline generation: `elas-serve generate` on a random checkpoint with a real tokenizer.

Run: python -m pytest tests/test_generate.py -v
"""

from __future__ import annotations

import shutil

import pytest
import torch

from elas_serve import LLM, SamplingParams
from elas_serve.cli import main
from elas_serve.models import load_model
from elas_serve.tokenizer import Tokenizer

from authors_ckpt import Variant, write_checkpoint


@pytest.fixture()
def ckpt(tmp_path, tokenizer_file):
    write_checkpoint(tmp_path, Variant("gen", vocab=320, extra_config={"eos_token_id": 0}))
    shutil.copy(tokenizer_file, tmp_path / "tokenizer.json")
    return tmp_path


def _greedy_without_cache(model, ids, n, eos):
    ids, new = list(ids), []
    for _ in range(n):
        logits = model.compute_logits(model(torch.tensor(ids + new), torch.arange(len(ids) + len(new))))
        token = int(logits[-1].argmax())
        if token == eos:
            break
        new.append(token)
    return new


def test_greedy_generation_equals_uncached_greedy(ckpt):
    model, tok = load_model(ckpt), Tokenizer.from_path(ckpt)
    prompt = "It is a truth universally"
    text = LLM(ckpt).generate(prompt, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0].text
    new = _greedy_without_cache(model, tok.encode(prompt), 12, eos=0)
    assert text == tok.decode(tok.encode(prompt) + new)[len(prompt):]


def test_cli_generate_greedy_and_seeded(ckpt, capsys):
    args = ["generate", "--model", str(ckpt), "--prompt", "It is a", "--max-tokens", "8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    llm = LLM(ckpt)
    greedy = llm.generate("It is a", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0].text
    assert out == "It is a" + greedy + "\n"
    seeded = [main(args + ["--temperature", "1", "--top-p", "0.9", "--seed", "7"]) for _ in range(2)]
    assert seeded == [0, 0]
    first, second = capsys.readouterr().out.split("\n")[:2]
    assert first == second and first.startswith("It is a")


@pytest.mark.parametrize("args", [["--max-tokens", "0"], ["--temperature", "-1"], ["--top-p", "0"]])
def test_cli_rejects_bad_arguments(ckpt, capsys, args):
    assert main(["generate", "--model", str(ckpt), "--prompt", "x", *args]) == 2
    assert "error" in capsys.readouterr().err
