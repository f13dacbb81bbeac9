"""Training data: text files -> tokenizer -> token shards (numpy memmap) -> batches.

- `read_texts`: files, or folders of files (recursively, hidden files skipped), read as UTF-8;
  every failure (missing, unreadable, not UTF-8, no text at all) is a `ValueError` naming the path.
- `train_tokenizer`: a byte-level BPE (GPT-2 style, `<|endoftext|>` as the document separator and
  EOS) trained with HF `tokenizers` on the training texts only.
- `prepare_shards`: `train.bin` / `val.bin` (uint16, or uint32 past 65,535 tokens) plus `meta.json`
  with the byte count of each split (for bits per byte) and a key over tokenizer + sources, so a
  cache directory is reused only for the same inputs. The held-out split is the given eval files,
  or else the last `val_fraction` of every training document (cut at a line break).
- `get_batch`: random windows, drawn from a numpy generator the caller seeds per (step, micro-batch,
  rank), so a resumed or multi-process run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from elas_serve.tokenizer import Tokenizer

EOS = "<|endoftext|>"


@dataclass(slots=True)
class TokenSplit:
    tokens: np.ndarray  # (N,) memmap of token ids
    num_bytes: int  # UTF-8 bytes of the text these tokens encode

    def __post_init__(self) -> None:
        if self.num_bytes <= 0:
            raise ValueError("a token split needs a positive byte count")

    def __len__(self) -> int:
        return len(self.tokens)


def list_text_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise ValueError(f"{path}: folder holds no files")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or directory")
    return files


def read_texts(paths: list[str], what: str = "corpus") -> list[tuple[Path, str]]:
    """(path, text) of every file under `paths`; refuses an empty corpus."""
    docs = []
    for path in list_text_files(paths):
        try:
            docs.append((path, path.read_text(encoding="utf-8")))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    if not any(text.strip() for _, text in docs):
        raise ValueError(f"{what} {', '.join(map(str, paths))} contains no text")
    return docs


def train_tokenizer(texts: list[str], vocab_size: int, path: Path) -> Path:
    """Train a byte-level BPE of (at most) `vocab_size` tokens and save it as `path`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (it needs "
                         f"at least 257: 256 bytes and {EOS})")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def _split_heldout(text: str, fraction: float) -> tuple[str, str]:
    """(train, val): val is the last `fraction` of `text`, starting at a line break."""
    cut = int(len(text) * (1 - fraction))
    newline = text.find("\n", cut)
    cut = newline + 1 if 0 <= newline < len(text) - 1 else cut
    return text[:cut], text[cut:]


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    """Documents joined with EOS (when the tokenizer has one)."""
    eos = tokenizer.eos_token_ids[:1]
    ids: list[int] = []
    for enc in tokenizer.tok.encode_batch(texts, add_special_tokens=False):
        ids += enc.ids + eos
    return ids


def _write_split(path: Path, ids: list[int], dtype: np.dtype) -> None:
    tmp = path.with_suffix(".tmp")
    np.asarray(ids, dtype=dtype).tofile(tmp)
    tmp.replace(path)


def prepare_shards(train_paths: list[str], eval_paths: list[str], val_fraction: float,
                   tokenizer: Tokenizer, tokenizer_file: Path, cache_dir: Path
                   ) -> tuple[TokenSplit, TokenSplit]:
    """Tokenize (or reuse) the train and held-out splits under `cache_dir`."""
    train_docs = read_texts(train_paths, "training corpus")
    eval_docs = read_texts(eval_paths, "held-out corpus") if eval_paths else []
    key = hashlib.sha256(Path(tokenizer_file).read_bytes())
    for path, text in train_docs + [(Path("--eval--"), "")] + eval_docs:
        key.update(f"{path.name}\0{hashlib.sha256(text.encode()).hexdigest()}\0".encode())
    key.update(f"val_fraction={val_fraction if not eval_docs else 0}".encode())
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32)
    meta_file = cache_dir / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    if meta.get("key") != key.hexdigest():
        if eval_docs:
            train_texts, val_texts = [t for _, t in train_docs], [t for _, t in eval_docs]
        else:
            pairs = [_split_heldout(t, val_fraction) for _, t in train_docs]
            train_texts, val_texts = [a for a, _ in pairs], [b for _, b in pairs]
        cache_dir.mkdir(parents=True, exist_ok=True)
        meta = {"key": key.hexdigest(), "dtype": dtype.name, "tokenizer": str(tokenizer_file),
                "train_files": [str(p) for p, _ in train_docs],
                "eval_files": [str(p) for p, _ in eval_docs]}
        for name, texts in (("train", train_texts), ("val", val_texts)):
            ids = encode_documents(tokenizer, texts)
            _write_split(cache_dir / f"{name}.bin", ids, dtype)
            meta[f"{name}_tokens"] = len(ids)
            meta[f"{name}_bytes"] = sum(len(t.encode("utf-8")) for t in texts)
        meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    splits = []
    for name in ("train", "val"):
        if meta[f"{name}_tokens"] == 0 or meta[f"{name}_bytes"] == 0:
            raise ValueError(f"the {name} split is empty (corpus too small?)")
        tokens = np.memmap(cache_dir / f"{name}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
        splits.append(TokenSplit(tokens, meta[f"{name}_bytes"]))
    return splits[0], splits[1]


def get_batch(split: TokenSplit, batch_size: int, seq_len: int, rng: np.random.Generator,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, both (B, S) int64, at random offsets of the split."""
    if len(split) < seq_len + 1:
        raise ValueError(f"the training split has {len(split)} tokens, fewer than "
                         f"seq_len + 1 = {seq_len + 1}: use more text or a shorter --seq-len")
    starts = rng.integers(0, len(split) - seq_len, size=batch_size)
    rows = np.stack([split.tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)
    xy = torch.from_numpy(rows).to(device)  # (B, S + 1)
    return xy[:, :-1], xy[:, 1:]


def eval_windows(split: TokenSplit, seq_len: int) -> list[int]:
    """Start offsets of consecutive windows covering the split: every token but the first is
    predicted exactly once (windows of `seq_len` targets; the last one may be shorter)."""
    if len(split) < 2:
        raise ValueError("the held-out split needs at least 2 tokens")
    return list(range(0, len(split) - 1, seq_len))
