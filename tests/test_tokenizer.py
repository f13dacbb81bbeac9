"""Tokenizer wrapper and incremental detokenization (what streaming and stop strings rely on).

Run: python -m pytest tests/test_tokenizer.py -v
"""

from __future__ import annotations

import json
import random

import pytest

from elas_serve.models import CheckpointError
from elas_serve.tokenizer import IncrementalDetokenizer, Tokenizer

from conftest import TEXT, train_tokenizer

SAMPLES = ["Hello world, it is a truth.", "Café naïve 東京 🙂 and more 🙂🙂!", "  two  spaces\nnewline\ttab",
           "single man in possession of a good fortune"]


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def tokenizer(request, tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp(request.param) / "tokenizer.json"
    return Tokenizer.from_path(train_tokenizer(path, metaspace=request.param == "metaspace"))


@pytest.mark.parametrize("text", SAMPLES)
def test_streamed_deltas_rebuild_the_text(tokenizer, text):
    prompt = tokenizer.encode("It is a truth")
    generated = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.push([t]) for t in generated] + [detok.flush()]
    whole = tokenizer.decode(prompt + generated)
    assert "".join(deltas) == detok.text
    assert tokenizer.decode(prompt) + detok.text == whole
    assert "\ufffd" not in detok.text  # nothing released mid-character


def test_deltas_never_split_a_character(tokenizer):
    """Emoji are several byte-level tokens: no delta may end inside one."""
    ids = tokenizer.encode("🙂🙂 東京", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [])
    for t in ids:
        assert "\ufffd" not in detok.push([t])


def test_flush_releases_a_partial_character(tmp_path):
    tok = Tokenizer.from_path(train_tokenizer(tmp_path / "t.json"))
    ids = tok.encode("ok 🙂", add_special_tokens=False)
    partial = ids[:-1]  # the emoji's last byte is missing
    detok = IncrementalDetokenizer(tok, [])
    streamed = "".join(detok.push([t]) for t in partial)
    assert streamed.startswith("ok") and "\ufffd" not in streamed
    assert streamed + detok.flush() == tok.decode(partial)


def test_random_tokens_match_full_decode(tmp_path):
    """Any sequence of whole-character tokens streams to exactly the full decode.

    NOTE: for arbitrary byte tokens (invalid UTF-8 in the middle) the windowed algorithm, like
    vLLM's and TGI's, may render the garbage differently from a one-shot decode; not tested.
    """
    tok = Tokenizer.from_path(train_tokenizer(tmp_path / "t.json"))
    whole_chars = [i for i in range(tok.vocab_size) if "\ufffd" not in tok.decode([i]) and tok.decode([i])]
    rng = random.Random(0)
    for _ in range(20):
        prompt = rng.choices(whole_chars, k=rng.randrange(1, 8))
        gen = rng.choices(whole_chars, k=30)
        detok = IncrementalDetokenizer(tok, prompt)
        text = "".join(detok.push([t]) for t in gen) + detok.flush()
        assert tok.decode(prompt) + text == tok.decode(prompt + gen)


def test_metaspace_leading_space_kept_after_prompt(tmp_path):
    tok = Tokenizer.from_path(train_tokenizer(tmp_path / "t.json", metaspace=True))
    prompt = tok.encode("a truth")
    detok = IncrementalDetokenizer(tok, prompt)
    text = "".join(detok.push([t]) for t in tok.encode(" universally", add_special_tokens=False))
    assert text == " universally"


def test_eos_and_chat_template_from_tokenizer_config(tmp_path):
    train_tokenizer(tmp_path / "tokenizer.json")
    tok = Tokenizer.from_path(tmp_path)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_ids == [0]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|endoftext|>"}, "chat_template": "{{ messages }}"}))
    tok = Tokenizer.from_path(tmp_path)
    assert tok.chat_template == "{{ messages }}" and tok.eos_token_ids == [0]
    assert Tokenizer.from_path(tmp_path, eos_token_ids=[5]).eos_token_ids == [5]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json: no such file"):
        Tokenizer.from_path(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="cannot load tokenizer"):
        Tokenizer.from_path(tmp_path)


def test_roundtrip(tokenizer):
    assert tokenizer.decode(tokenizer.encode(TEXT[:200], add_special_tokens=False)) == TEXT[:200]
