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


def cmd_generate(args: argparse.Namespace) -> int:
    from elas_serve.config import EngineConfig
    from elas_serve.engine.llm_engine import LLMEngine
    from elas_serve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    if params.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    engine = LLMEngine.from_config(EngineConfig(
        model=args.model or DEMO_CHECKPOINT, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype))
    engine.add_request(None, args.prompt, params)
    sys.stdout.write(args.prompt)
    while engine.has_unfinished_requests():
        for out in engine.step():
            sys.stdout.write(out.new_text)
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
