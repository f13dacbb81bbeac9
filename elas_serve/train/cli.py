"""`elas-serve train` and `elas-serve data`: the trainer's command line (argparse lives here).

`main(argv)` takes argv[0] == "train" or "data" and returns the exit code: 0 on success, 2 with
one `elas-serve: error: ...` line (no traceback) on bad input: bad flags, an unknown preset, an
empty or unreadable corpus, a tokenizer that does not match, a checkpoint that cannot be resumed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from .config import FFNS, LOWRANK_SCOPES, PARALLEL_MODES, SAVE_DTYPES, TrainConfig
from .presets import PRESETS


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump; main() turns it into exit 2
        raise UsageError(message)


def build_train_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="elas-serve train", description="Train an ELAS (or baseline) checkpoint.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="training text files or folders of them (UTF-8)")
    d.add_argument("--eval-data", nargs="+", default=[], metavar="PATH",
                   help="held-out text files/folders (default: the last --val-fraction of each "
                        "training document)")
    d.add_argument("--val-fraction", type=float, default=0.05)
    d.add_argument("--tokenizer", default=None, help="reuse this tokenizer.json (default: train "
                   "a byte-level BPE on the training data)")
    d.add_argument("--vocab-size", type=int, default=None,
                   help="BPE size to train (default 4096), or the size --tokenizer must have")
    d.add_argument("--cache-dir", default=None, help="token shards (default: OUT/tokens)")
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)}")
    for flag in ("hidden-size", "intermediate-size", "num-layers", "num-heads", "num-kv-heads",
                 "attn-rank", "mlp-rank", "max-position-embeddings"):
        m.add_argument(f"--{flag}", type=int, default=None, help="override the preset")
    m.add_argument("--lowrank-scope", choices=LOWRANK_SCOPES, default="all",
                   help="which projections are LORO low-rank ('none' = full rank)")
    m.add_argument("--full-rank", action="store_const", const="none", dest="lowrank_scope",
                   help="same as --lowrank-scope none")
    m.add_argument("--ffn", choices=FFNS, default="relu2",
                   help="relu2 = ELAS squared-ReLU FFN, swiglu = the LLaMA baseline")
    m.add_argument("--no-2by4", dest="two_by_four", action="store_false",
                   help="ELAS FFN without the 2:4 activation sparsity")
    m.add_argument("--dense-warmup-steps", type=int, default=0,
                   help="updates before the 2:4 mask is switched on")
    m.add_argument("--tie-word-embeddings", action="store_true")
    m.add_argument("--init-std", type=float, default=0.02)
    o = p.add_argument_group("optimisation")
    o.add_argument("--seq-len", type=int, default=256)
    o.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per process")
    o.add_argument("--grad-accum-steps", type=int, default=1)
    o.add_argument("--max-steps", type=int, default=1000)
    o.add_argument("--lr", type=float, default=3e-3)
    o.add_argument("--min-lr-ratio", type=float, default=0.1)
    o.add_argument("--warmup-steps", type=int, default=100)
    o.add_argument("--weight-decay", type=float, default=0.1)
    o.add_argument("--beta1", type=float, default=0.9)
    o.add_argument("--beta2", type=float, default=0.95)
    o.add_argument("--grad-clip", type=float, default=1.0, help="0 = no clipping")
    o.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--out", dest="out_dir", required=True, help="run / checkpoint directory")
    r.add_argument("--eval-interval", type=int, default=200)
    r.add_argument("--eval-batches", type=int, default=16)
    r.add_argument("--log-interval", type=int, default=10)
    r.add_argument("--save-interval", type=int, default=0, help="0 = only the final checkpoint")
    r.add_argument("--keep-last", type=int, default=2)
    r.add_argument("--resume", nargs="?", const="latest", default=None, metavar="STEP_DIR",
                   help="continue from OUT's latest step_* checkpoint, or from STEP_DIR")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda")
    r.add_argument("--parallel", choices=PARALLEL_MODES, default="ddp",
                   help="how processes share the model: ddp = a full replica each, fsdp = "
                        "weights, gradients and optimizer state sharded (docs/training.md)")
    r.add_argument("--save-dtype", choices=SAVE_DTYPES, default="float32")
    r.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    r.add_argument("--no-progress", dest="progress", action="store_false")
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


def cmd_train(argv: list[str]) -> int:
    from .trainer import train

    args = vars(build_train_parser().parse_args(argv))
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in args.items() if k in known})
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
