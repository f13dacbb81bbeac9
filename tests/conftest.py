"""Shared fixtures: a tokenizer trained in-process (hermetic) and checkpoint factories.

Tests run on the CPU; Triton kernels run under the interpreter (TRITON_INTERPRET=1 is set here,
before anything imports triton). Engines run eagerly ($ELAS_SERVE_ENFORCE_EAGER=1) unless a test
passes `enforce_eager=False`. Tests marked `gpu` are skipped without CUDA.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# NOTE: engines (and the servers tests spawn, which inherit this) run eagerly unless a test asks for
# compilation: a background compile per engine would hold both cores for tens of seconds each.
os.environ.setdefault("ELAS_SERVE_ENFORCE_EAGER", "1")

from pathlib import Path

import pytest
import torch

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. Café, naïve, 東京, and emoji 🙂 keep the byte-level paths honest. "
) * 4


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def train_tokenizer(path: Path, vocab_size: int = 320, metaspace: bool = False) -> Path:
    """A small BPE trained on TEXT: byte-level (GPT-2 style) or Metaspace (SentencePiece style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if metaspace:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
        alphabet = [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=["<unk>", "</s>", *alphabet])
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")
