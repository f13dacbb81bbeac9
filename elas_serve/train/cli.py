"""`elas-serve train` and `elas-serve data`: the trainer's command line (argparse lives here).

`main(argv)` takes argv[0] == "train" or "data" and returns the exit code: 0 on success, 2 with
one `elas-serve: error: ...` line (no traceback) on bad input: bad flags, an unknown preset, an
empty or unreadable corpus, a tokenizer that does not match, a checkpoint that cannot be resumed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from elas_serve.cli_help import DefaultsHelpFormatter

from .config import FFNS, LOWRANK_SCOPES, PARALLEL_MODES, SAVE_DTYPES, TrainConfig
from .presets import PRESETS


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump; main() turns it into exit 2
        raise UsageError(message)


_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
_DEFAULTS.update({f.name: f.default_factory() for f in fields(TrainConfig) if f.default_factory is not MISSING})


def _opt(group: argparse._ArgumentGroup, flag: str, help: str, dest: str | None = None, **kw) -> None:
    """A flag whose default (and, unless given, type) is TrainConfig's field of the same name."""
    dest = dest or flag.lstrip("-").replace("-", "_")
    default = _DEFAULTS.get(dest)
    if "action" not in kw and "type" not in kw and isinstance(default, (int, float, str)):
        kw["type"] = type(default)
    group.add_argument(flag, dest=dest, default=default, help=help, **kw)


def build_train_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="elas-serve train", description="Train an ELAS (or baseline) checkpoint.",
                formatter_class=DefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="training text files or folders of them (UTF-8)")
    _opt(d, "--eval-data", "held-out text files/folders (default: the last --val-fraction of each "
         "training document)", nargs="+", metavar="PATH")
    _opt(d, "--val-fraction", "held-out share of each training document without --eval-data")
    _opt(d, "--tokenizer", "reuse this tokenizer.json (default: train a byte-level BPE on the training data)")
    _opt(d, "--vocab-size", "BPE size to train (default 4096), or the size --tokenizer must have", type=int)
    _opt(d, "--cache-dir", "token shards (default: OUT/tokens)")
    m = p.add_argument_group("model (the preset's sizes unless overridden)")
    _opt(m, "--preset", f"one of {', '.join(PRESETS)}")
    for flag in ("hidden-size", "intermediate-size", "num-layers", "num-heads", "num-kv-heads",
                 "attn-rank", "mlp-rank", "max-position-embeddings"):
        _opt(m, f"--{flag}", "override the preset's value", type=int)
    _opt(m, "--lowrank-scope", "which projections are LORO low-rank ('none' = full rank)", choices=LOWRANK_SCOPES)
    m.add_argument("--full-rank", action="store_const", const="none", dest="lowrank_scope",
                   default=_DEFAULTS["lowrank_scope"], help="same as --lowrank-scope none")
    _opt(m, "--ffn", "relu2 = ELAS squared-ReLU FFN, swiglu = the LLaMA baseline", choices=FFNS)
    m.add_argument("--no-2by4", dest="two_by_four", action="store_false",
                   help="ELAS FFN without the 2:4 activation sparsity (2:4 is on unless given)")
    _opt(m, "--dense-warmup-steps", "updates before the 2:4 mask is switched on")
    m.add_argument("--tie-word-embeddings", action="store_true", help="share the embedding and lm_head weights")
    _opt(m, "--init-std", "std of the initial weights (low-rank factors: of their product)")
    o = p.add_argument_group("optimisation")
    _opt(o, "--seq-len", "tokens per training sequence")
    _opt(o, "--batch-size", "sequences per micro-batch per process")
    _opt(o, "--grad-accum-steps", "micro-batches per optimizer step")
    _opt(o, "--max-steps", "optimizer steps of the run")
    _opt(o, "--lr", "peak learning rate (AdamW)")
    _opt(o, "--min-lr-ratio", "the cosine decays to lr times this")
    _opt(o, "--warmup-steps", "linear warm-up steps (keep it below --max-steps)")
    _opt(o, "--weight-decay", "AdamW weight decay, on matrices only")
    _opt(o, "--beta1", "AdamW beta1")
    _opt(o, "--beta2", "AdamW beta2")
    _opt(o, "--grad-clip", "gradient-norm clipping; 0 = none")
    _opt(o, "--seed", "initialisation and batch order")
    r = p.add_argument_group("run")
    r.add_argument("--out", dest="out_dir", required=True, help="run / checkpoint directory")
    _opt(r, "--eval-interval", "held-out evaluation every this many steps; 0 = only the final one")
    _opt(r, "--eval-batches", "micro-batches of a periodic evaluation (the final one is full)")
    _opt(r, "--log-interval", "steps between lines of metrics.jsonl")
    _opt(r, "--save-interval", "checkpoint every this many steps; 0 = only the final checkpoint")
    _opt(r, "--keep-last", "step checkpoints kept")
    _opt(r, "--resume", "continue from OUT's latest step_* checkpoint, or from STEP_DIR", nargs="?",
         const="latest", metavar="STEP_DIR")
    _opt(r, "--device", "auto | cpu | cuda")
    _opt(r, "--parallel", "how processes share the model: ddp = a full replica each, fsdp = weights, gradients "
         "and optimizer state sharded (docs/training.md)", choices=PARALLEL_MODES)
    _opt(r, "--save-dtype", "dtype of the final checkpoint's weights", choices=SAVE_DTYPES)
    _opt(r, "--num-threads", "torch CPU threads (default: torch's)", type=int)
    r.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (training and evaluation)")
    return p


def build_data_parser() -> argparse.ArgumentParser:
    from .corpus import CORPORA

    p = _Parser(prog="elas-serve data",
                description="Fetch a public-domain corpus from Debian's archive (sha256-checked).")
    p.add_argument("--corpus", default="austen", help=f"one of {', '.join(CORPORA)}")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: data/CORPUS)")
    p.add_argument("--deb", type=Path, default=None,
                   help="use this already-downloaded .deb instead of `apt-get download`")
    p.add_argument("--heldout", default=None, help="document to hold out (default: the corpus's)")
    return p


def config_warnings(cfg: TrainConfig) -> list[str]:
    """What a valid config will not do as the flags suggest (the run still starts)."""
    out = []
    if cfg.warmup_steps > cfg.max_steps:
        peak = cfg.lr * cfg.max_steps / cfg.warmup_steps  # NOTE: trainer.lr_at of the last step
        out.append(f"--warmup-steps {cfg.warmup_steps} is longer than --max-steps {cfg.max_steps}: the "
                   f"learning rate only warms up and peaks at {peak:.3g}, not --lr {cfg.lr:g}")
    if cfg.two_by_four and cfg.dense_warmup_steps >= cfg.max_steps:
        out.append(f"--dense-warmup-steps {cfg.dense_warmup_steps} is not shorter than --max-steps "
                   f"{cfg.max_steps}: the 2:4 sparsity is never switched on during training")
    return out


def cmd_train(argv: list[str]) -> int:
    from .trainer import train

    args = vars(build_train_parser().parse_args(argv))
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in args.items() if k in known})
    for warning in config_warnings(cfg):
        print(f"elas-serve train: warning: {warning}", file=sys.stderr)
    train(cfg)
    return 0


def cmd_data(argv: list[str]) -> int:
    from .corpus import fetch_corpus

    args = build_data_parser().parse_args(argv)
    out = args.out or Path("data") / args.corpus
    manifest = fetch_corpus(args.corpus, out, args.deb, args.heldout)
    for rel, info in manifest["files"].items():
        print(f"{out / rel}: {info['chars']:,} chars, sha256 {info['sha256'][:16]}...")
    print(f"elas-serve data: {manifest['package']} {manifest['version']} (sha256 verified) -> {out}")
    return 0


def main(argv: list[str]) -> int:
    """Entry point for `elas-serve train|data ...` (argv[0] is the subcommand)."""
    from elas_serve.models import CheckpointError

    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    handlers = {"train": cmd_train, "data": cmd_data}
    try:
        if command not in handlers:
            raise UsageError(f"expected 'train' or 'data', got {command!r}")
        return handlers[command](rest)
    except (UsageError, ValueError, CheckpointError, FloatingPointError) as e:
        print(f"elas-serve: error: {e}", file=sys.stderr)
        return 2
