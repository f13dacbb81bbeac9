"""Run setup: which tokenizer, which token shards, and where a resumed run picks up.

Tokenizer choice, in order: `--tokenizer PATH` (checked against `--vocab-size` and against the
checkpoint being resumed), the resumed checkpoint's own `tokenizer.json`, or a byte-level BPE
trained on the training texts into `<out>/tokenizer.json`. The main process builds the tokenizer
and shards first; the others then read them, so there is one writer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from elas_serve.models import CheckpointError
from elas_serve.tokenizer import Tokenizer

from .checkpoint import RESUME_FILES
from .config import MODEL_FIELDS, TrainConfig
from .data import TokenSplit, prepare_shards, read_texts, train_tokenizer

DEFAULT_VOCAB_SIZE = 4096


def resolve_resume(cfg: TrainConfig, out: Path) -> tuple[Path | None, dict[str, Any]]:
    """The step directory to resume from (or None) and its training state, checked against cfg."""
    if cfg.resume is None:
        return None, {}
    if cfg.resume == "latest":
        found = sorted(p for p in out.glob("step_*") if (p / "training_state.json").exists())
        if not found:
            raise ValueError(f"--resume latest: no step_* checkpoint in {out} to resume from")
        path = found[-1]
    else:
        path = Path(cfg.resume)
    missing = [n for n in ("training_state.json", RESUME_FILES[cfg.parallel], "model.safetensors",
                           "tokenizer.json") if not (path / n).exists()]
    other = next((mode for mode, file in RESUME_FILES.items() if (path / file).exists()), None)
    if missing and other is not None and other != cfg.parallel:
        raise ValueError(f"--resume {path}: it was saved with --parallel {other} "
                         f"({RESUME_FILES[other]}); resume it with --parallel {other}")
    if missing:
        raise ValueError(f"--resume {path}: not a resumable checkpoint (missing "
                         f"{', '.join(missing)}; resume from a step_* directory)")
    state = json.loads((path / "training_state.json").read_text())
    before = state.get("train_config", {})
    now = cfg.to_dict()
    changed = [f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in MODEL_FIELDS if before.get(k) != now[k]]
    if changed:
        raise ValueError(f"--resume {path}: the model differs from the checkpoint's "
                         f"({'; '.join(changed)})")
    if state["global_step"] > cfg.max_steps:
        raise ValueError(f"--resume {path}: it is at step {state['global_step']}, past "
                         f"--max-steps {cfg.max_steps}")
    return path, state


def _same_vocab(a: Tokenizer, b: Tokenizer) -> bool:
    return a.tok.get_vocab(with_added_tokens=True) == b.tok.get_vocab(with_added_tokens=True)


def resolve_tokenizer(cfg: TrainConfig, out: Path, resume_dir: Path | None) -> Path:
    """The tokenizer.json this run uses (training one if needed; main process only)."""
    if cfg.tokenizer is not None:
        file = Path(cfg.tokenizer)
        file = file / "tokenizer.json" if file.is_dir() else file
        try:
            given = Tokenizer.from_path(file)
        except CheckpointError as e:
            raise ValueError(str(e)) from None
        if cfg.vocab_size is not None and given.vocab_size != cfg.vocab_size:
            raise ValueError(f"{file}: the tokenizer has {given.vocab_size} tokens but "
                             f"--vocab-size is {cfg.vocab_size}")
        if resume_dir is not None and not _same_vocab(given, Tokenizer.from_path(resume_dir)):
            raise ValueError(f"{file}: its vocabulary does not match the tokenizer of the "
                             f"checkpoint being resumed ({resume_dir / 'tokenizer.json'})")
        return file
    if resume_dir is not None:
        return resume_dir / "tokenizer.json"
    texts = [text for _, text in read_texts(cfg.data, "training corpus")]
    return train_tokenizer(texts, cfg.vocab_size or DEFAULT_VOCAB_SIZE, out / "tokenizer.json")


def prepare_data(cfg: TrainConfig, out: Path, resume_dir: Path | None, main_proc: bool
                 ) -> tuple[Tokenizer, Path, TokenSplit, TokenSplit]:
    """(tokenizer, its file, train split, held-out split), built by the main process first."""
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "tokens"

    def build(file: Path) -> tuple[Tokenizer, Path, TokenSplit, TokenSplit]:
        tokenizer = Tokenizer.from_path(file)
        train, val = prepare_shards(cfg.data, cfg.eval_data, cfg.val_fraction, tokenizer, file,
                                    cache)
        return tokenizer, file, train, val

    result, error = None, [None]
    if main_proc:
        try:
            out.mkdir(parents=True, exist_ok=True)
            result = build(resolve_tokenizer(cfg, out, resume_dir))
        except (ValueError, CheckpointError) as e:
            error[0] = str(e)
    if dist.is_initialized():
        # NOTE: the main process's error is broadcast so every rank fails the same way
        # instead of the others hanging at the next collective.
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise ValueError(error[0])
    return result if result is not None else build(_shared_tokenizer_path(cfg, out, resume_dir))


def _shared_tokenizer_path(cfg: TrainConfig, out: Path, resume_dir: Path | None) -> Path:
    if cfg.tokenizer is not None:
        file = Path(cfg.tokenizer)
        return file / "tokenizer.json" if file.is_dir() else file
    return resume_dir / "tokenizer.json" if resume_dir is not None else out / "tokenizer.json"
