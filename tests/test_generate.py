"""Offline generation: `elas-serve generate` on a random checkpoint with a real tokenizer.

Run: python -m pytest tests/test_generate.py -v
"""

from __future__ import annotations

import shutil

import pytest
import torch
from authors_ckpt import Variant, write_checkpoint

from elas_serve.cli import main
from elas_serve.generate import generate_stream
from elas_serve.models import load_model
from elas_serve.tokenizer import Tokenizer


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
    text = "".join(generate_stream(model, tok, prompt, max_tokens=12))
    new = _greedy_without_cache(model, tok.encode(prompt), 12, eos=0)
    assert text == tok.decode(tok.encode(prompt) + new)[len(prompt):]


def test_seeded_sampling_is_reproducible(ckpt):
    model, tok = load_model(ckpt), Tokenizer.from_path(ckpt)
    runs = ["".join(generate_stream(model, tok, "a single man", 10, temperature=1.0, top_p=0.9, seed=s))
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]


def test_cli_generate(ckpt, capsys):
    assert main(["generate", "--model", str(ckpt), "--prompt", "It is a", "--max-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("It is a") and len(out) > len("It is a\n")


@pytest.mark.parametrize("args", [["--max-tokens", "0"], ["--temperature", "-1"], ["--top-p", "0"]])
def test_cli_rejects_bad_arguments(ckpt, capsys, args):
    assert main(["generate", "--model", str(ckpt), "--prompt", "x", *args]) == 2
    assert "error" in capsys.readouterr().err
