"""Data path: corpus extraction from a .deb (sha256-checked), held-out split, shards, schedule.

The .deb here is built in the test (ar archive + data.tar.xz holding an R lazy-load database
written with `rdata`), so nothing is downloaded; `elas-serve data` on the real package is the same
code with the pinned sha256.
Run: python -m pytest tests/test_train_data.py -v
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import run_train

from elas_serve.cli import main as cli_main
from elas_serve.tokenizer import Tokenizer
from elas_serve.train.config import TrainConfig
from elas_serve.train.corpus import CORPORA, fetch_corpus
from elas_serve.train.data import get_batch, prepare_shards
from elas_serve.train.trainer import lr_at

from conftest import train_tokenizer

DOCS = {"novel": ["CHAPTER 1", "", "It is a truth universally acknowledged.", "Café naïve."],
        "other": ["Another book.", "", "With two paragraphs."]}


def _rds(obj) -> bytes:
    import rdata
    return rdata.unparser.unparse_data(rdata.conversion.convert_python_to_r_data(obj),
                                       file_type="rds")


def make_deb(path: Path, prefix: str) -> Path:
    """A Debian package whose data.tar.xz holds `prefix`/Rdata.rdx + Rdata.rdb with DOCS."""
    rdb, index = b"", {}
    for name, lines in DOCS.items():
        payload = _rds(np.array(lines))
        entry = struct.pack(">I", len(payload)) + zlib.compress(payload)
        index[name] = np.array([len(rdb), len(entry)], dtype=np.int32)
        rdb += entry
    rdx = gzip.compress(_rds({"variables": index, "references": {}, "compressed": True}))
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w:xz") as tar:
        for name, data in (("Rdata.rdx", rdx), ("Rdata.rdb", rdb)):
            info = tarfile.TarInfo(f"./{prefix}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    members = [("debian-binary", b"2.0\n"), ("data.tar.xz", tar_buf.getvalue())]
    ar = b"!<arch>\n"
    for name, data in members:
        ar += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
        ar += b"\n" if len(data) % 2 else b""
    path.write_bytes(ar)
    return path


def test_fetch_corpus_from_a_deb(tmp_path):
    base = CORPORA["austen"]
    deb = make_deb(tmp_path / "pkg.deb", base.rdata_dir)
    spec = replace(base, sha256=hashlib.sha256(deb.read_bytes()).hexdigest(), heldout="other")
    manifest = fetch_corpus("austen", tmp_path / "out", deb=deb, spec=spec)
    assert (tmp_path / "out" / "train" / "novel.txt").read_text() == "\n".join(DOCS["novel"]) + "\n"
    assert (tmp_path / "out" / "heldout" / "other.txt").exists()
    text = (tmp_path / "out" / "heldout" / "other.txt").read_bytes()
    assert manifest["files"]["heldout/other.txt"]["sha256"] == hashlib.sha256(text).hexdigest()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["deb_sha256"] == spec.sha256


def test_data_cli_refuses_a_deb_whose_sha256_differs(tmp_path, capsys):
    deb = make_deb(tmp_path / "pkg.deb", CORPORA["austen"].rdata_dir)
    assert cli_main(["data", "--deb", str(deb), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not match the pinned" in err and err.startswith("elas-serve: error:")
    assert not (tmp_path / "out").exists()


def test_heldout_split_and_shard_cache(tmp_path, tokenizer_file):
    (tmp_path / "doc.txt").write_text("".join(f"line {i} of the book\n" for i in range(200)))
    tok = Tokenizer.from_path(tokenizer_file)
    train, val = prepare_shards([str(tmp_path / "doc.txt")], [], 0.1, tok, tokenizer_file,
                                tmp_path / "cache")
    text = (tmp_path / "doc.txt").read_text()
    assert val.num_bytes + train.num_bytes == len(text.encode())
    val_text = tok.decode([int(t) for t in val.tokens])
    assert text.endswith(val_text) and val_text.startswith("line 18")  # cut at a line break
    assert 0.08 < len(val_text) / len(text) < 0.12
    mtime = (tmp_path / "cache" / "train.bin").stat().st_mtime_ns
    prepare_shards([str(tmp_path / "doc.txt")], [], 0.1, tok, tokenizer_file, tmp_path / "cache")
    assert (tmp_path / "cache" / "train.bin").stat().st_mtime_ns == mtime  # reused
    other = train_tokenizer(tmp_path / "t2" / "tokenizer.json", vocab_size=280)
    prepare_shards([str(tmp_path / "doc.txt")], [], 0.1, Tokenizer.from_path(other), other,
                   tmp_path / "cache")
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["tokenizer"] == str(other)  # another tokenizer re-tokenizes
    x, y = get_batch(train, 3, 8, np.random.default_rng([0, 1, 2]), torch.device("cpu"))
    assert x.shape == y.shape == (3, 8) and torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = get_batch(train, 3, 8, np.random.default_rng([0, 1, 2]), torch.device("cpu"))
    assert torch.equal(x, x2)


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(data=["x"], out_dir="x", lr=1e-3, warmup_steps=10, max_steps=110,
                      min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-2)


def test_dense_warmup_switches_2by4_on_afterwards(tmp_path):
    """Dense warm-up covering the whole run == --no-2by4; a shorter one is not."""
    assert run_train(tmp_path, "warm_all", "--dense-warmup-steps", "6", steps=6) == 0
    assert run_train(tmp_path, "no24", "--no-2by4", "--tokenizer",
                     str(tmp_path / "warm_all" / "tokenizer.json"), steps=6) == 0
    assert run_train(tmp_path, "warm_3", "--dense-warmup-steps", "3", "--tokenizer",
                     str(tmp_path / "warm_all" / "tokenizer.json"), steps=6) == 0
    w = {r: load_file(str(tmp_path / r / "model.safetensors")) for r in ("warm_all", "no24", "warm_3")}
    name = "model.layers.0.mlp.up_proj.weight_in"
    assert torch.equal(w["warm_all"][name], w["no24"][name])
    assert not torch.equal(w["warm_3"][name], w["no24"][name])
    config = json.loads((tmp_path / "warm_3" / "config.json").read_text())
    assert config["activation_2by4"] is True and config["activation_dense_warmup_steps"] == 3
