"""`elas-serve` command line: argparse lives here and nowhere else.

Exit codes: 0 success, 2 bad usage or a checkpoint that cannot be served (one clear message).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from elas_serve.config import DEFAULT_MAX_CHOICES
from elas_serve.errors import CheckpointError
from elas_serve.utils import DEMO_CHECKPOINT, DTYPES, resolve_device

SIZE_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def is_loopback(host: str) -> bool:
    """Whether binding `host` exposes the server only to this machine."""
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def byte_size(text: str) -> int:
    """'1073741824', '512M', '2GiB' -> bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        return int(float(t[:-1]) * SIZE_SUFFIXES[t[-1]]) if t and t[-1] in SIZE_SUFFIXES else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r}") from None


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
    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    _add_model_args(srv)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--ffn-backend", default="auto", choices=["auto", "dense", "sparse24", "fused"])
    srv.add_argument("--served-model-name", default=None,
                     help="model name clients send (default: the --model argument, or elas-demo)")
    srv.add_argument("--max-model-len", type=int, default=None)
    srv.add_argument("--max-num-seqs", type=int, default=128)
    srv.add_argument("--max-num-batched-tokens", type=int, default=2048)
    srv.add_argument("--block-size", type=int, default=16)
    kv = srv.add_mutually_exclusive_group()
    kv.add_argument("--kv-cache-memory", type=byte_size, default=None, help="bytes (e.g. 2G)")
    kv.add_argument("--num-kv-blocks", type=int, default=None)
    srv.add_argument("--no-prefix-caching", action="store_true")
    srv.add_argument("--max-queued-requests", type=int, default=None,
                     help="reject (503) requests beyond this many waiting, at least 1 (default: no limit)")
    srv.add_argument("--max-choices-per-request", type=int, default=DEFAULT_MAX_CHOICES,
                     help=f"refuse (400) requests of more than this many prompts x n (default: {DEFAULT_MAX_CHOICES})")
    srv.add_argument("--api-key", default=os.environ.get("ELAS_SERVE_API_KEY"),
                     help="require 'Authorization: Bearer KEY' (default: $ELAS_SERVE_API_KEY)")
    srv.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="seconds in-flight requests get to finish after SIGTERM")
    srv.add_argument("--max-request-bytes", type=byte_size, default=16 << 20)
    srv.add_argument("--seed", type=int, default=0)
    srv.add_argument("--cpu-threads", type=int, default=None,
                     help="torch threads on CPU (default: all cores but one)")

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


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.ffn_backend in ("sparse24", "fused") and resolve_device(args.device).type == "cpu":
        # NOTE: Triton kernels run on the CPU only in the interpreter, which must be chosen
        # before they are imported (below); correct, but far slower than the dense backend.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        logging.getLogger("elas_serve").warning(
            "--ffn-backend %s on the CPU runs its Triton kernels in the interpreter (slow)", args.ffn_backend)
    from elas_serve.config import EngineConfig
    from elas_serve.server.launch import serve

    if args.max_queued_requests is not None and args.max_queued_requests < 1:
        raise ValueError("--max-queued-requests must be at least 1 (leave it out for no limit)")
    if args.max_choices_per_request < 1:
        raise ValueError("--max-choices-per-request must be at least 1")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key (or ELAS_SERVE_API_KEY) is empty: give a key, or unset it to serve without one")
    if args.api_key is None and not is_loopback(args.host):
        logging.getLogger("elas_serve").warning(
            "serving on %s without an API key: anyone who can reach this address can use the server "
            "(set --api-key or ELAS_SERVE_API_KEY)", args.host)
    config = EngineConfig(
        model=args.model or DEMO_CHECKPOINT, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
        ffn_backend=args.ffn_backend, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=not args.no_prefix_caching, enforce_eager=args.enforce_eager, seed=args.seed,
        cpu_threads=args.cpu_threads)
    name = args.served_model_name or (str(args.model) if args.model else "elas-demo")
    return serve(config, args.host, args.port, name, args.api_key, args.max_queued_requests,
                 args.shutdown_timeout, args.max_request_bytes, args.max_choices_per_request)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("train", "data"):  # the trainer owns its own flags
        from elas_serve.train.cli import main as train_main
        return train_main(argv)
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "serve": cmd_serve}[args.command](args)
    except (CheckpointError, ValueError) as e:
        print(f"elas-serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
