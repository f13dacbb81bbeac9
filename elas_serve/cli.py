"""`elas-serve` command line: argparse lives here and nowhere else.

Exit codes: 0 success, 2 bad usage or a checkpoint that cannot be served (one clear message).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from elas_serve.models import CheckpointError
from elas_serve.utils import DEMO_CHECKPOINT, DTYPES


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint directory (default: the bundled demo checkpoint)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.json or a directory with one (default: the checkpoint's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elas-serve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train an ELAS checkpoint (see `elas-serve train --help`)")
    sub.add_parser("data", help="fetch and tokenize a corpus (see `elas-serve data --help`)")
    gen = sub.add_parser("generate", help="complete one prompt offline and print the text")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    return parser


def load_model_and_tokenizer(args: argparse.Namespace):
    from elas_serve.models import load_model
    from elas_serve.tokenizer import Tokenizer
    from elas_serve.utils import resolve_device, resolve_dtype

    model_dir = args.model or DEMO_CHECKPOINT
    device = resolve_device(args.device)
    model = load_model(model_dir, resolve_dtype(args.dtype, device), device)
    tokenizer = Tokenizer.from_path(args.tokenizer or model_dir, model.config.eos_token_ids)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{tokenizer.name}: tokenizer has {tokenizer.vocab_size} tokens but "
                              f"the model's vocab_size is {model.config.vocab_size}")
    return model, tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    from elas_serve.generate import generate_stream

    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")
    model, tokenizer = load_model_and_tokenizer(args)
    sys.stdout.write(args.prompt)
    for delta in generate_stream(model, tokenizer, args.prompt, args.max_tokens,
                                 args.temperature, args.top_p, args.seed):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("train", "data"):  # the trainer owns its own flags
        from elas_serve.train.cli import main as train_main
        return train_main(argv)
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate}[args.command](args)
    except (CheckpointError, ValueError) as e:
        print(f"elas-serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
