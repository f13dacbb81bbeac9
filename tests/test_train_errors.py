"""Bad input to `elas-serve train` gets exit code 2 and one clear `elas-serve: error:` line.

Run: python -m pytest tests/test_train_errors.py -v
"""

from __future__ import annotations

import pytest
from test_train import run_train, write_corpus

from elas_serve.cli import main as cli_main

from conftest import train_tokenizer


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("elas-serve: error: "), err
    assert "Traceback" not in err
    return lines[0]


def train_cli(tmp_path, *args: str) -> int:
    return cli_main(["train", "--out", str(tmp_path / "out"), "--no-progress", *args])


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n\n")
    assert train_cli(tmp_path, "--data", str(tmp_path / "empty.txt")) == 2
    assert "contains no text" in one_error_line(capsys)


def test_missing_file(tmp_path, capsys):
    assert train_cli(tmp_path, "--data", str(tmp_path / "nope.txt")) == 2
    assert "nope.txt: no such file or directory" in one_error_line(capsys)


def test_unreadable_file(tmp_path, capsys):
    (tmp_path / "binary.txt").write_bytes(b"text then \xff\xfe\x00 garbage")
    assert train_cli(tmp_path, "--data", str(tmp_path / "binary.txt")) == 2
    assert "binary.txt: not UTF-8 text" in one_error_line(capsys)


def test_unknown_preset(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    assert train_cli(tmp_path, "--data", str(corpus), "--preset", "7b") == 2
    line = one_error_line(capsys)
    assert "unknown preset '7b'" in line and "tiny, 60m, 130m, 350m, 1b" in line


def test_tokenizer_whose_vocabulary_does_not_match(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    tok = train_tokenizer(tmp_path / "tok" / "tokenizer.json", vocab_size=320)
    assert train_cli(tmp_path, "--data", str(corpus), "--tokenizer", str(tok),
                     "--vocab-size", "4096") == 2
    assert "the tokenizer has 320 tokens but --vocab-size is 4096" in one_error_line(capsys)


def test_resume_with_another_tokenizer(tmp_path, capsys):
    assert run_train(tmp_path, "run", "--save-interval", "2", steps=3) == 0
    other = train_tokenizer(tmp_path / "tok" / "tokenizer.json", vocab_size=300)
    capsys.readouterr()
    assert run_train(tmp_path, "run", "--resume", "--tokenizer", str(other), steps=4) == 2
    assert "its vocabulary does not match the tokenizer of the checkpoint" in one_error_line(capsys)


def test_corrupt_tokenizer_file(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    assert train_cli(tmp_path, "--data", str(corpus), "--tokenizer",
                     str(tmp_path / "tokenizer.json")) == 2
    assert "cannot load tokenizer" in one_error_line(capsys)


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "batch_size must be positive"),
    (["--lowrank-scope", "everything"], "invalid choice"),
    (["--attn-rank", "64"], "attn rank 64 is not below min(in, out) = 64"),
    (["--seq-len", "4096"], "seq_len=4096 exceeds max_position_embeddings=1024"),
    (["--ffn", "swiglu", "--dense-warmup-steps", "5"], "only applies to the ELAS"),
    (["--max-steps", "ten"], "invalid int value"),
])
def test_bad_flags(tmp_path, capsys, args, message):
    corpus = write_corpus(tmp_path)
    assert train_cli(tmp_path, "--data", str(corpus), "--hidden-size", "64", "--num-heads", "4",
                     "--num-kv-heads", "2", *args) == 2
    assert message in one_error_line(capsys)


def test_corpus_too_small_for_seq_len(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("A few words only.\n")
    assert train_cli(tmp_path, "--data", str(tmp_path / "tiny.txt"), "--vocab-size", "300",
                     "--hidden-size", "64", "--num-heads", "4", "--seq-len", "64") == 2
    assert "fewer than seq_len + 1 = 65" in one_error_line(capsys)
