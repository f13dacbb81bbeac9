"""`elas-serve` command line: argparse lives here and nowhere else.

`serve`'s flags are made from the fields of `EngineConfig` and `ServerConfig` (`config.py`): the
flag is the field's name with dashes, its help and default come from the field, so nothing is
written twice. Exit codes: 0 success, 2 bad usage or a checkpoint that cannot be served (one clear
message).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import types
import typing
from dataclasses import MISSING, fields

from elas_serve.cli_help import DefaultsHelpFormatter
from elas_serve.config import EngineConfig, ReplicaConfig, ServerConfig
from elas_serve.kernels.backends import TRITON_BACKENDS

SIZE_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def byte_size(text: str) -> int:
    """'1073741824', '512M', '2GiB' -> bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        return int(float(t[:-1]) * SIZE_SUFFIXES[t[-1]]) if t and t[-1] in SIZE_SUFFIXES else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r}") from None


def is_loopback(host: str) -> bool:
    """Whether binding `host` exposes the server only to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _scalar_type(cls: type, name: str) -> type:
    """The non-None type of a config field (`int | None` -> int)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(
        hint, types.UnionType) or typing.get_origin(hint) is typing.Union else [hint]
    return args[0]


def add_config_flags(parser: argparse.ArgumentParser, cls: type, only: tuple[str, ...] | None = None) -> None:
    """One flag per field of the dataclass `cls` (or of those in `only`), from its metadata."""
    for f in fields(cls):
        if only is not None and f.name not in only:
            continue
        meta = dict(f.metadata)
        default = f.default_factory() if f.default_factory is not MISSING else (
            None if f.default is MISSING else f.default)  # NOTE: a factory reads the field's $env
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        help_text = meta.pop("help", None)
        meta.pop("env", None)
        declared = meta.pop("declared", default)  # what the flag turns on or off is the declared default's
        if meta.pop("byte_size", False):
            meta["type"] = byte_size
        if isinstance(default, bool):
            action = "store_false" if declared else "store_true"
            if declared:  # NOTE: a flag that turns a default-on feature off says so
                help_text = f"turn off: {help_text}"
            parser.add_argument(flag, dest=f.name, action=action, default=default, help=help_text)
            continue
        meta.setdefault("type", _scalar_type(cls, f.name))
        parser.add_argument(flag, dest=f.name, default=default, help=help_text, **meta)


def config_from_args(cls: type, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


MODEL_FIELDS = ("model", "tokenizer", "device", "dtype")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elas-serve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train an ELAS checkpoint (see `elas-serve train --help`)")
    sub.add_parser("data", help="fetch and tokenize a corpus (see `elas-serve data --help`)")
    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API", formatter_class=DefaultsHelpFormatter)
    add_config_flags(srv.add_argument_group("model and engine"), EngineConfig)
    add_config_flags(srv.add_argument_group("server"), ServerConfig)
    add_config_flags(srv.add_argument_group("replicas on Ray Serve (pip install 'elas-serve[ray]'; docs/scaling.md)"),
                     ReplicaConfig)

    gen = sub.add_parser("generate", help="complete one prompt offline and print the text",
                         formatter_class=DefaultsHelpFormatter)
    add_config_flags(gen, EngineConfig, MODEL_FIELDS)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from elas_serve.llm import LLM
    from elas_serve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    if params.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    # NOTE: eager: for one prompt a compile (tens of seconds on a CPU) never pays for itself
    llm = LLM(**{name: getattr(args, name) for name in MODEL_FIELDS}, enforce_eager=True)
    sys.stdout.write(args.prompt)
    for _, out in llm.iter_outputs([args.prompt], [params]):
        sys.stdout.write(out.outputs[0].text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    engine, server = config_from_args(EngineConfig, args), config_from_args(ServerConfig, args)
    logging.basicConfig(level=server.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if engine.ffn_backend in TRITON_BACKENDS and not engine.device.startswith("cuda") and (
            engine.device == "cpu" or not _cuda_available()):
        # NOTE: Triton kernels run on the CPU only in the interpreter, which must be chosen
        # before they are imported (the engine core process inherits the environment).
        os.environ.setdefault("TRITON_INTERPRET", "1")
        logging.getLogger("elas_serve").warning(
            "--ffn-backend %s on the CPU runs its Triton kernels in the interpreter (slow)", engine.ffn_backend)
    if server.api_key is None and not is_loopback(server.host):
        logging.getLogger("elas_serve").warning(
            "serving on %s without an API key: anyone who can reach this address can use the server "
            "(set --api-key or ELAS_SERVE_API_KEY)", server.host)
    replicas = config_from_args(ReplicaConfig, args)
    if replicas.enabled:
        from elas_serve.ray_serve.launch import serve_on_ray
        return serve_on_ray(engine, server, replicas)
    from elas_serve.server.launch import serve
    return serve(engine, server)


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("train", "data"):  # the trainer owns its own flags
        from elas_serve.train.cli import main as train_main
        return train_main(argv)
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "serve": cmd_serve}[args.command](args)
    except ValueError as e:  # CheckpointError and InvalidRequestError are ValueErrors
        print(f"elas-serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
