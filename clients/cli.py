"""`elas-loadtest` command line (`run`, `compare`, `report`): argparse lives here and nowhere else.

Flags carry vLLM `bench serve`'s names wherever it has one, so scripts carry over.
Exit codes: 0 done; 1 the run could not start or no request succeeded (one line says why);
2 bad usage; 130 interrupted. Never a traceback for any of these.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from pathlib import Path

from .client import LoadTestError, check_target
from .compare import CompareConfig, parse_servers, run_compare
from .loadgen import LoadConfig, run_benchmark
from .metrics import METRICS, parse_slos
from .report import result_path, save_result, summary_table


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--num-prompts", type=int, default=1000, help="requests to send (default 1000)")
    p.add_argument("--duration", type=float, default=None, help="send no request after this many seconds")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests/s, arrivals Gamma(burstiness); inf (default): all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="1 (default): Poisson; <1 burstier; >1 smoother")
    p.add_argument("--dataset-name", choices=["random", "custom"], default=None,
                   help="random token ids (default) or custom: the prompts of --dataset-path")
    p.add_argument("--dataset-path", type=Path, default=None,
                   help='prompts: JSONL lines {"prompt": ..., "output_tokens": N} or plain text, one per line')
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)] (default 0: fixed)")
    p.add_argument("--custom-output-len", type=int, default=256, help="output tokens of file prompts")
    p.add_argument("--ignore-eos", action="store_true", help="always on for random prompts")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--num-warmups", type=int, default=0, help="requests sent before measuring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--percentile-metrics", default=",".join(METRICS),
                   help=f"comma-separated subset of {','.join(METRICS)} (default: all)")
    p.add_argument("--metric-percentiles", "--percentiles", dest="metric_percentiles", type=_floats,
                   default=None, help='comma-separated percentiles, e.g. "50,90,99" (default "99")')
    p.add_argument("--goodput", "--slo", dest="goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput (DistServe), e.g. --goodput ttft:500 tpot:50 e2el:5000")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds without a byte from the server before a request fails (default 600)")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--allow-remote", action="store_true", help="allow a server that is not on loopback")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elas-loadtest", description="Load-test an OpenAI-compatible server.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one load test against a running server")
    run.add_argument("--base-url", default=None, help="server URL (default http://HOST:PORT)")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    run.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    run.add_argument("--label", default=None)
    run.add_argument("--save-result", action="store_true", help="write the result JSON")
    run.add_argument("--save-detailed", action="store_true", help="with per-request arrays (implies --save-result)")
    run.add_argument("--result-dir", type=Path, default=None)
    run.add_argument("--result-filename", default=None)
    _add_workload_args(run)

    cmp = sub.add_parser("compare", help="the same sweep against several FFN backends of one checkpoint")
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
    if args.dataset_name == "custom" and args.dataset_path is None:
        raise ValueError("--dataset-name custom needs --dataset-path")
    if args.dataset_name == "random" and args.dataset_path is not None:
        raise ValueError("--dataset-path is for --dataset-name custom, not random")
    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                  ("top_k", args.top_k)) if v is not None}
    return LoadConfig(
        base_url=base_url, endpoint=args.endpoint, num_prompts=args.num_prompts, duration=args.duration,
        request_rate=args.request_rate, burstiness=args.burstiness, dataset_path=args.dataset_path,
        random_input_len=args.random_input_len, random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio, custom_output_len=args.custom_output_len,
        ignore_eos=args.ignore_eos, sampling=sampling, num_warmups=args.num_warmups, seed=args.seed,
        percentile_metrics=[m.strip() for m in args.percentile_metrics.split(",") if m.strip()],
        metric_percentiles=args.metric_percentiles or default_percentiles or [99.0],
        goodput=parse_slos(args.goodput or []), request_timeout=args.request_timeout,
        disable_tqdm=args.disable_tqdm, max_concurrency=args.max_concurrency, **overrides)


def cmd_run(args: argparse.Namespace) -> int:
    base_url = check_target(args.base_url or f"http://{args.host}:{args.port}", args.allow_remote)
    cfg = load_config(args, base_url, model=args.model, label=args.label, save_detailed=args.save_detailed)
    result = asyncio.run(run_benchmark(cfg))
    print(summary_table(result, cfg.percentile_metrics, cfg.metric_percentiles))
    if args.save_result or args.save_detailed or args.result_filename:
        print(f"result: {save_result(result, result_path(result, args.result_dir, args.result_filename))}")
    if result["completed"] == 0:
        raise LoadTestError("no request succeeded (errors above)")
    return 0


def cmd_compare(args: argparse.Namespace, argv: list[str]) -> int:
    from .compare_report import environment, ratio_table, write

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
    path = write(stem, data, args.result_dir)
    print("\n".join(ratio_table({**data, "stem": stem})))
    print(f"results: {path} (+ .md, .png)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)  # exits 2 on bad flags
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "report":
            from .compare_report import rewrite
            print(f"rewrote the markdown and PNG of {rewrite(args.json)}")
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
