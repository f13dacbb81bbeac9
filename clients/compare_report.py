"""The files a comparison leaves: raw JSON, the markdown made from it (ratios to the baseline and
absolute numbers), and a PNG of TTFT and TPOT percentiles against output throughput.

Every number in the markdown is read from the JSON written next to it. The environment record and
the writing of JSON + markdown are benchmarks/common.py's (in a source checkout; an installed
package records versions only).
"""

from __future__ import annotations

import importlib.util
import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .compare import format_value
from .metrics import percentile_key

COMMON = Path(__file__).resolve().parent.parent / "benchmarks" / "common.py"
SWEEP_TITLES = {"request_rate": "request rate (req/s)", "max_concurrency": "max concurrency"}
INTERPRETER_NOTE = ("**Read with care:** there was no GPU, so the Triton backends ({}) ran under the Triton "
                    "interpreter, which executes each kernel in numpy on the CPU. Their timings measure the "
                    "interpreter, not the kernels: they say nothing about GPU speed.")


def _bench_common():
    if not COMMON.exists():
        return None
    spec = importlib.util.spec_from_file_location("elas_benchmarks_common", COMMON)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def environment(on_cpu: bool) -> dict[str, Any]:
    common = _bench_common()
    if common is not None:
        import torch
        return common.environment(torch.device("cpu" if on_cpu else "cuda"))
    try:
        pkg = version("elas-serve")
    except PackageNotFoundError:
        pkg = "unknown"
    return {"device": platform.processor() or "unknown", "elas_serve": pkg, "python": platform.python_version(),
            "commit": "unknown (not a source checkout)"}


def rewrite(json_path: Path) -> list[Path]:
    """The markdown and PNG again from a comparison's JSON (e.g. after a change of layout)."""
    try:
        data = json.loads(json_path.read_text())
        stem = data["stem"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{json_path} is not the JSON of an `elas-loadtest compare`") from None
    return write(stem, data, json_path.parent)


def write(stem: str, data: dict[str, Any], out_dir: Path) -> list[Path]:
    """`<stem>.json`, `<stem>.md` and, with matplotlib, `<stem>.png` in out_dir: the files written."""
    data = {**data, "stem": stem}
    png = out_dir / f"{stem}.png"
    png.unlink(missing_ok=True)  # NOTE: never leave a PNG of an older run next to this markdown
    plotted = plot(data, png)
    md = markdown(data, plotted)
    common = _bench_common()
    if common is not None:
        path = common.write_results(stem, data, md, out_dir)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{stem}.md").write_text(md)
        path = out_dir / f"{stem}.json"
        path.write_text(json.dumps(data, indent=2) + "\n")
    return [path, out_dir / f"{stem}.md"] + ([png] if plotted else [])


def files_message(written: list[Path]) -> str:
    """What was written, and why there is no PNG when there is none."""
    text = "wrote " + ", ".join(str(p) for p in written)
    if not any(p.suffix == ".png" for p in written):
        text += "\nno PNG: matplotlib is not installed (pip install 'elas-serve[loadtest]', then " \
                f"`elas-loadtest report {written[0]}` draws it from the JSON)"
    return text


def _hi(data: dict[str, Any]) -> str:
    """Key prefix of the highest percentile reported ('p99')."""
    return percentile_key(max(float(p) for p in data["load"]["metric_percentiles"]))


def ratio_table(data: dict[str, Any]) -> list[str]:
    base, hi = data["baseline"], _hi(data)
    cols = [("output_throughput", "output tok/s"), ("median_ttft_ms", "median TTFT"),
            (f"{hi}_ttft_ms", f"{hi.upper()} TTFT"), ("median_tpot_ms", "median TPOT"),
            (f"{hi}_tpot_ms", f"{hi.upper()} TPOT"), ("median_itl_ms", "median ITL"), ("mean_e2el_ms", "mean E2EL")]
    lines = [f"| {SWEEP_TITLES[data['sweep']]} | server | " + " | ".join(c[1] for c in cols) + " |",
             "|---:|---|" + "---:|" * len(cols)]
    for i, v in enumerate(data["values"]):
        b = data["results"][base][i]
        for label, rows in data["results"].items():
            if label == base:
                continue
            r = rows[i]
            cells = [f"{r[k] / b[k]:.3g}x" if b.get(k) and r.get(k) is not None else "n/a" for k, _ in cols]
            lines.append(f"| {format_value(v)} | {label} | " + " | ".join(cells) + " |")
    return lines


def absolute_table(data: dict[str, Any]) -> list[str]:
    hi = _hi(data)
    cols = [("request_throughput", "req/s", 3), ("output_throughput", "output tok/s", 2),
            ("mean_ttft_ms", "mean TTFT ms", 1), ("median_ttft_ms", "median TTFT ms", 1),
            (f"{hi}_ttft_ms", f"{hi.upper()} TTFT ms", 1), ("mean_tpot_ms", "mean TPOT ms", 2),
            ("median_tpot_ms", "median TPOT ms", 2), (f"{hi}_tpot_ms", f"{hi.upper()} TPOT ms", 2),
            ("median_itl_ms", "median ITL ms", 2), (f"{hi}_itl_ms", f"{hi.upper()} ITL ms", 2),
            ("mean_e2el_ms", "mean E2EL ms", 1)]
    lines = [f"| {SWEEP_TITLES[data['sweep']]} | server | ok / failed | " + " | ".join(c[1] for c in cols) + " |",
             "|---:|---|---:|" + "---:|" * len(cols)]
    for i, v in enumerate(data["values"]):
        for label, rows in data["results"].items():
            r = rows[i]
            cells = [f"{r[k]:.{d}f}" if r.get(k) is not None else "n/a" for k, _, d in cols]
            counts = f"{r['completed']} / {r['failed']}"
            lines.append(f"| {format_value(v)} | {label} | {counts} | " + " | ".join(cells) + " |")
    return lines


def markdown(data: dict[str, Any], plotted: bool) -> str:
    env, load, base = data["environment"], data["load"], data["baseline"]
    servers = ", ".join(f"`{s['label']}` (" + (f"`--ffn-backend {s['backend']}`" if s["started_by_compare"]
                        else f"at {s['url']}") + f", serving `{s['server_ffn_backend']}`)" for s in data["servers"])
    if load["dataset_path"] is None:
        lo = load["random_range_ratio"]
        work = (f"random token-id prompts of {load['random_input_len']} tokens, {load['random_output_len']} output "
                f"tokens each (`ignore_eos`" + (f", lengths within ±{lo:g}" if lo else "") + ")")
    else:
        work = f"prompts from `{load['dataset_path']}`"
    shape = ("closed loop (requests sent back to back)" if data["sweep"] == "max_concurrency" and
             load["request_rate"] == "inf" else f"arrivals Gamma(burstiness {load['burstiness']:g})")
    bound = f"{load['num_prompts']} requests per point" + (f" or {load['duration']:g} s" if load["duration"] else "")
    failed = sum(r["failed"] for rows in data["results"].values() for r in rows)
    errors = sorted({m for rows in data["results"].values() for r in rows for m in r["errors_by_message"]})
    lines = [f"# Load test: {', '.join(data['results'])} ({env['device']})", ""]
    if data["interpreter"]:
        triton = sorted({f"`{s['backend']}`" for s in data["servers"] if s["backend"] not in (None, "dense")})
        lines += [INTERPRETER_NOTE.format(", ".join(triton)), ""]
    lines += [f"Checkpoint: {data['model']}. Servers: {servers}, measured one at a time. Workload: {work}; "
              f"{shape}; {bound}; {load['num_warmups']} warm-up requests; seed {load['seed']} (the same prompts "
              f"and arrival times for every server). Metrics as vLLM's `bench serve` defines them "
              "(docs/loadtest.md): TTFT and E2EL per request, TPOT excludes the first token, ITL per chunk.", "",
              f"Environment: torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
              f"{data['cpu_count']} CPU cores, server flags `{' '.join(data['server_args']) or '(defaults)'}`, "
              f"commit `{env['commit']}`, {env.get('date', '')}. "
              f"Raw: `{data['stem']}.json`; made by `{data['command']}`.", "",
              f"## Ratios to `{base}`", "",
              "Latency ratios above 1 mean slower than the baseline; throughput ratios above 1 mean more.", "",
              *ratio_table(data), "", "## Absolute numbers", "", *absolute_table(data), "",
              f"Failed requests: {failed}." + (" Errors: " + "; ".join(f"`{e}`" for e in errors) if errors else ""), ""]
    if plotted:
        lines += [f"![TTFT and TPOT against throughput]({data['stem']}.png)", ""]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> bool:
    """TTFT and TPOT (median and the highest percentile) against output throughput, one curve per
    server; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    hi = _hi(data)
    panels = [("median_ttft_ms", "median TTFT"), (f"{hi}_ttft_ms", f"{hi.upper()} TTFT"),
              ("median_tpot_ms", "median TPOT"), (f"{hi}_tpot_ms", f"{hi.upper()} TPOT")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, title) in zip(axes.flat, panels):
        ys = []
        for label, rows in data["results"].items():
            x = [r["output_throughput"] for r in rows]
            y = [r[key] for r in rows]
            ys += y
            ax.plot(x, y, "o-", label=label)
            for xi, yi, v in zip(x, y, data["values"]):
                ax.annotate(format_value(v), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        xs = [r["output_throughput"] for rows in data["results"].values() for r in rows]
        for values, set_scale in ((ys, ax.set_yscale), (xs, ax.set_xscale)):
            positive = [v for v in values if v > 0]
            if positive and max(positive) / min(positive) > 20:  # backends far apart: log scale
                set_scale("log")
        ax.set(xlabel="output throughput (tok/s)", ylabel="ms", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    sweep = SWEEP_TITLES[data["sweep"]]
    fig.suptitle(f"elas-serve load test on {data['environment']['device']} (points labelled by {sweep})"
                 + ("\nTriton backends under the CPU interpreter: not GPU speed" if data["interpreter"] else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
