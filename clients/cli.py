"""`elas-loadtest` command line (`run`, `compare`, `report`): argparse lives here and nowhere else.

Flags carry vLLM `bench serve`'s names wherever it has one, so scripts carry over.
Exit codes: 0 done; 1 the run could not start or no request succeeded (one line says why);
2 bad usage; 130 interrupted. Never a traceback for any of these.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from pathlib import Path

from elas_serve.cli_help import DefaultsHelpFormatter

from .client import LoadTestError, check_target
from .compare import CompareConfig, parse_servers, run_compare
from .loadgen import BACKENDS, DATASETS, LoadConfig, run_benchmark
from .metrics import METRICS, parse_slos
from .report import result_path, save_result, summary_table


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    """vLLM's KEY=VALUE lists (--metadata, --header)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} takes KEY=VALUE pairs, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
                  "repetition_penalty")


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="openai",
                   help="openai and vllm: /v1/completions; openai-chat: /v1/chat/completions")
    p.add_argument("--endpoint", default=None,
                   help="API path (default: /v1/chat/completions for openai-chat, else /v1/completions)")
    p.add_argument("--num-prompts", type=int, default=1000, help="requests to send")
    p.add_argument("--duration", type=float, default=None, help="send no request after this many seconds")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests/s, arrivals Gamma(burstiness); inf: all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="1: Poisson; <1 burstier; >1 smoother")
    p.add_argument("--dataset-name", choices=DATASETS, default=None,
                   help="random token ids (default), sharegpt (a local ShareGPT JSON) or custom (a prompts "
                        "file), the last two from --dataset-path")
    p.add_argument("--dataset-path", type=Path, default=None,
                   help='a ShareGPT JSON, or prompts: JSONL lines {"prompt": ..., "output_tokens": N} or plain '
                        "text, one per line. Local files only")
    p.add_argument("--tokenizer", default=None,
                   help="a local tokenizer.json or a folder with one, to count ShareGPT tokens (default: "
                        "the server's /tokenize; nothing is downloaded)")
    p.add_argument("--input-len", type=int, default=None, help="sets --random-input-len")
    p.add_argument("--output-len", type=int, default=None,
                   help="sets --random-output-len, --sharegpt-output-len and --custom-output-len")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)] (0: fixed)")
    p.add_argument("--random-prefix-len", type=int, default=0,
                   help="token ids every random prompt starts with (before --random-input-len more)")
    p.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="output tokens of ShareGPT requests (default: the reference completion's length)")
    p.add_argument("--custom-output-len", type=int, default=256, help="output tokens of file prompts")
    p.add_argument("--disable-shuffle", action="store_true", help="ShareGPT entries in file order")
    p.add_argument("--ignore-eos", action="store_true", help="always on for random prompts")
    for name in SAMPLING_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int if name == "top_k" else float, default=None,
                       help="sent when given (default: the server's)")
    p.add_argument("--extra-body", type=_json_object, default=None, help="JSON object merged into every request")
    p.add_argument("--header", nargs="*", default=None, metavar="KEY=VALUE", help="HTTP headers of every request")
    p.add_argument("--request-id-prefix", default="", help="sent as x-request-id PREFIX<n>")
    p.add_argument("--metadata", nargs="*", default=None, metavar="KEY=VALUE",
                   help="key-value pairs recorded in the result JSON")
    p.add_argument("--num-warmups", type=int, default=0, help="requests sent before measuring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--percentile-metrics", default=",".join(METRICS),
                   help=f"comma-separated subset of {','.join(METRICS)}")
    p.add_argument("--metric-percentiles", "--percentiles", dest="metric_percentiles", type=_floats,
                   default=None, help='comma-separated percentiles, e.g. "50,90,99" (default: "99")')
    p.add_argument("--goodput", "--slo", dest="goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput (DistServe), e.g. --goodput ttft:500 tpot:50 e2el:5000")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds without a byte from the server before a request fails")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--allow-remote", action="store_true", help="allow a server that is not on loopback")
    compat = p.add_argument_group("accepted for vLLM's command lines, no effect here")
    compat.add_argument("--trust-remote-code", action="store_true", help="no remote code is ever run")
    compat.add_argument("--skip-chat-template", action="store_true",
                        help="prompts are never templated on the client")
    compat.add_argument("--tokenizer-mode", default="auto", help="the tokenizer is tokenizer.json or the server's")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elas-loadtest", description="Load-test an OpenAI-compatible server.")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = DefaultsHelpFormatter
    run = sub.add_parser("run", help="one load test against a running server (vLLM bench serve's flags)",
                         formatter_class=fmt)
    run.add_argument("--base-url", default=None, help="server URL (default http://HOST:PORT)")
    run.add_argument("--host", default="127.0.0.1", help="server host, when no --base-url")
    run.add_argument("--port", type=int, default=8000, help="server port, when no --base-url")
    run.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    run.add_argument("--served-model-name", default=None, help="the model name sent, if not --model")
    run.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    run.add_argument("--label", default=None)
    run.add_argument("--save-result", action="store_true", help="write the result JSON")
    run.add_argument("--append-result", action="store_true", help="append the result JSON as a line to the file")
    run.add_argument("--save-detailed", action="store_true", help="with per-request arrays (implies --save-result)")
    run.add_argument("--result-dir", type=Path, default=None, help="(default: the current folder)")
    run.add_argument("--result-filename", default=None)
    _add_workload_args(run)

    cmp = sub.add_parser("compare", help="the same sweep against several FFN backends of one checkpoint",
                         formatter_class=fmt)
    cmp.add_argument("--model", type=Path, default=None, help="checkpoint to serve (default: the bundled demo)")
    cmp.add_argument("--backends", default=None,
                     help="servers to start, baseline first: BACKEND or LABEL=BACKEND, comma-separated "
                          "(default dense,sparse24,fused; none when --url is given)")
    cmp.add_argument("--url", action="append", default=[], metavar="LABEL=URL",
                     help="a server already running (repeatable); a LABEL of --backends takes this URL")
    sweep = cmp.add_mutually_exclusive_group(required=True)
    sweep.add_argument("--request-rates", type=_floats, help="sweep request rates, e.g. 1,2,4")
    sweep.add_argument("--concurrencies", type=_floats, help="sweep --max-concurrency, e.g. 1,4,16")
    cmp.add_argument("--max-concurrency", type=int, default=None, help="cap during a request-rate sweep")
    cmp.add_argument("--device", default="auto")
    cmp.add_argument("--dtype", default="auto")
    cmp.add_argument("--server-args", default="", help='more `elas-serve serve` flags, e.g. "--max-num-seqs 64"')
    cmp.add_argument("--server-timeout", type=float, default=600.0, help="seconds a server may take to start")
    cmp.add_argument("--result-dir", type=Path, default=Path("."))
    cmp.add_argument("--result-filename", default=None, help="file stem (default loadtest_<servers>_<device>)")
    cmp.add_argument("--server-log-dir", type=Path, default=None, help="server logs (default: --result-dir)")
    _add_workload_args(cmp)

    rep = sub.add_parser("report", help="write a comparison's markdown and PNG again from its JSON")
    rep.add_argument("json", type=Path)
    return parser


def load_config(args: argparse.Namespace, base_url: str, default_percentiles: list[float] | None = None,
                **overrides) -> LoadConfig:
    if args.input_len is not None:
        args.random_input_len = args.input_len
    if args.output_len is not None:
        args.random_output_len = args.sharegpt_output_len = args.custom_output_len = args.output_len
    sampling = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    return LoadConfig(
        base_url=base_url, backend=args.backend, endpoint=args.endpoint, num_prompts=args.num_prompts,
        duration=args.duration, request_rate=args.request_rate, burstiness=args.burstiness,
        dataset_name=args.dataset_name, dataset_path=args.dataset_path, tokenizer=args.tokenizer,
        random_input_len=args.random_input_len, random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio, random_prefix_len=args.random_prefix_len,
        sharegpt_output_len=args.sharegpt_output_len, custom_output_len=args.custom_output_len,
        disable_shuffle=args.disable_shuffle, ignore_eos=args.ignore_eos, sampling=sampling,
        extra_body=args.extra_body or {}, headers=_pairs(args.header, "--header"),
        request_id_prefix=args.request_id_prefix, metadata=_pairs(args.metadata, "--metadata"),
        num_warmups=args.num_warmups, seed=args.seed,
        percentile_metrics=[m.strip() for m in args.percentile_metrics.split(",") if m.strip()],
        metric_percentiles=args.metric_percentiles or default_percentiles or [99.0],
        goodput=parse_slos(args.goodput or []), request_timeout=args.request_timeout,
        disable_tqdm=args.disable_tqdm, max_concurrency=args.max_concurrency, **overrides)


def cmd_run(args: argparse.Namespace) -> int:
    base_url = check_target(args.base_url or f"http://{args.host}:{args.port}", args.allow_remote)
    cfg = load_config(args, base_url, model=args.model, served_model_name=args.served_model_name,
                      label=args.label, save_detailed=args.save_detailed)
    result = asyncio.run(run_benchmark(cfg))
    print(summary_table(result, cfg.percentile_metrics, cfg.metric_percentiles))
    if args.save_result or args.save_detailed or args.append_result or args.result_filename:
        path = result_path(result, args.result_dir, args.result_filename)
        print(f"result: {save_result(result, path, append=args.append_result)}")
    if result["completed"] == 0:
        raise LoadTestError("no request succeeded (errors above)")
    return 0


def cmd_compare(args: argparse.Namespace, argv: list[str]) -> int:
    from .compare_report import environment, files_message, ratio_table, write

    backends = args.backends if args.backends is not None else ("" if args.url else "dense,sparse24,fused")
    servers = parse_servers(backends, args.url)
    sweep, values = ("request_rate", args.request_rates) if args.request_rates else \
        ("max_concurrency", args.concurrencies)
    if args.concurrencies and args.max_concurrency is not None:
        raise ValueError("--max-concurrency caps a --request-rates sweep; --concurrencies sets it per point")
    load = load_config(args, "http://127.0.0.1", default_percentiles=[90.0, 99.0])
    cfg = CompareConfig(servers=servers, sweep=sweep, values=values, load=load, model=args.model,
                        device=args.device, dtype=args.dtype, server_args=shlex.split(args.server_args),
                        server_timeout=args.server_timeout, allow_remote=args.allow_remote,
                        result_dir=args.result_dir, log_dir=args.server_log_dir)
    data = run_compare(cfg)
    data["environment"] = environment(cfg.on_cpu)
    data["command"] = shlex.join(["elas-loadtest", *argv])
    stem = args.result_filename or "loadtest_" + "_".join(s.label for s in servers) + \
        ("_cpu" if cfg.on_cpu else "_gpu")
    written = write(stem, data, args.result_dir)
    print("\n".join(ratio_table({**data, "stem": stem})))
    print(files_message(written))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)  # exits 2 on bad flags
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "report":
            from .compare_report import files_message, rewrite
            print(files_message(rewrite(args.json)))
            return 0
        return cmd_compare(args, argv)
    except ValueError as e:
        print(f"elas-loadtest: error: {e}", file=sys.stderr)
        return 2
    except LoadTestError as e:
        print(f"elas-loadtest: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("elas-loadtest: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
