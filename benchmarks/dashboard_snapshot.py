"""The Grafana dashboard's panels over a real run, without Grafana: a stand-in snapshot.

Starts the container's entrypoint (deploy/entrypoint.sh, the demo checkpoint, on the CPU unless
CUDA is there), a real Prometheus (Debian's `prometheus`) with deploy/prometheus.yml pointed at it,
and three phases of load from `elas-loadtest` (Poisson arrivals, then a shared prompt prefix, then
more users than `--max-num-seqs` on a small KV cache, so requests wait and get preempted). Then it
evaluates every target of deploy/grafana/dashboards/elas-serve.json with Prometheus' query_range,
exactly as Grafana would with "all models", and draws the panels in the dashboard's order with
matplotlib. It writes docs/benchmarks/dashboard_snapshot.{json,md,png}; the PNG says that it is a
stand-in, because no Docker engine (so no Grafana image) exists where this ran.

    python benchmarks/dashboard_snapshot.py            # about 3.5 minutes on 2 CPU cores
    python benchmarks/dashboard_snapshot.py --quick    # 8-second phases, to check the script
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from elas_serve.clients.loadgen import LoadConfig, run_benchmark

from common import DOCS, ROOT, environment, write_results

sys.path.insert(0, str(ROOT / "deploy"))
sys.path.insert(0, str(ROOT / "tests"))
import promstack  # noqa: E402
from serve_process import ServeProcess, free_port  # noqa: E402

SERVER_ARGS = ["--max-num-seqs", "8", "--num-kv-blocks", "224"]  # small on purpose: waiting and preemption
PHASES = [  # (name, LoadConfig fields)
    ("Poisson 2 req/s", dict(request_rate=2.0, random_input_len=128, random_output_len=32)),
    ("Poisson 4 req/s, 64-token shared prefix",
     dict(request_rate=4.0, random_input_len=128, random_output_len=32, random_prefix_len=64)),
    ("16 users back to back, long requests", dict(max_concurrency=16, random_input_len=384, random_output_len=128)),
]


def run_phases(url: str, seconds: float, pause: float) -> list[dict[str, Any]]:
    phases = []
    for i, (name, fields) in enumerate(PHASES):
        start = time.time()
        r = asyncio.run(run_benchmark(LoadConfig(base_url=url, num_prompts=2000, duration=seconds, seed=i,
                                                 disable_tqdm=True, **fields)))
        phases.append({"name": name, "start": start, "end": time.time(), "load": fields,
                       **{k: r[k] for k in ("completed", "failed", "request_throughput", "output_throughput",
                                            "median_ttft_ms", "median_itl_ms")}})
        print(f"  {name}: {r['completed']} ok, {r['failed']} failed, {r['output_throughput']:.1f} output tok/s, "
              f"median TTFT {r['median_ttft_ms']:.1f} ms")
        time.sleep(pause)
    return phases


def snapshot(prom: promstack.Prometheus, start: float, end: float, step: float, rate_interval: str) -> list[dict]:
    panels: dict[str, dict] = {}
    for q in promstack.panel_queries(rate_interval=rate_interval):
        p = panels.setdefault(q.panel, {"title": q.panel, "kind": q.kind, "unit": q.unit, "targets": []})
        series = prom.query_range(q.expr, start, end, step)
        p["targets"].append({"legend": q.legend, "expr": q.expr, "series": [
            {"metric": s["metric"], "values": [[float(t), float(v)] for t, v in s["values"]]} for s in series]})
    return list(panels.values())


def legend(template: str, metric: dict[str, str]) -> str:
    for key, value in metric.items():
        template = template.replace("{{" + key + "}}", value)
    return template


SCALE = {"s": (1000.0, "ms"), "percentunit": (100.0, "%"), "tokens/s": (1.0, "tokens/s"), "reqps": (1.0, "req/s")}


def plot(data: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    bg, panel_bg, fg = "#181b1f", "#111217", "#ccccdc"
    panels, t0 = data["panels"], data["phases"][0]["start"]
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(22, 4.2 * rows), facecolor=bg)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, p in zip(axes.flat, panels):
        ax.set_facecolor(panel_bg)
        ax.set_title(p["title"], color=fg, fontsize=11, loc="left")
        for side in ax.spines.values():
            side.set_color("#2c3235")
        ax.tick_params(colors=fg, labelsize=8)
        if p["kind"] == "stat":
            names = [legend(t["legend"], s["metric"]) for t in p["targets"] for s in t["series"]]
            ax.text(0.5, 0.5, ", ".join(names) or "no data", color="#73bf69", fontsize=34, ha="center",
                    va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        scale, unit = SCALE.get(p["unit"], (1.0, p["unit"] if p["unit"] not in ("short", "none") else ""))
        for n, ph in enumerate(data["phases"], 1):
            ax.axvspan(ph["start"] - t0, ph["end"] - t0, color="#3274d9", alpha=0.12)
            ax.text((ph["start"] + ph["end"]) / 2 - t0, 0.97, str(n), color=fg, fontsize=8, ha="center", va="top",
                    transform=ax.get_xaxis_transform())
        for t in p["targets"]:
            for s in t["series"]:
                xs = [x - t0 for x, _ in s["values"]]
                ax.plot(xs, [v * scale for _, v in s["values"]], lw=1.4, label=legend(t["legend"], s["metric"]))
        ax.set_ylabel(unit, color=fg, fontsize=9)
        ax.set_xlabel("seconds from the start of the load", color=fg, fontsize=8)
        ax.grid(color="#2c3235", lw=0.6)
        ax.legend(fontsize=8, facecolor=panel_bg, edgecolor="#2c3235", labelcolor=fg, loc="upper left")
    env = data["environment"]
    fig.suptitle("Stand-in for the elas-serve Grafana dashboard (no Docker engine, so no Grafana, where this ran): "
                 "each panel's PromQL from deploy/grafana/dashboards/elas-serve.json, evaluated by "
                 f"{data['prometheus_version']} (query_range, step {data['step_s']:g} s) and drawn with matplotlib.\n"
                 f"Demo checkpoint on {env['device']}, server flags `{' '.join(data['server_args'])}`; shaded: the "
                 "load phases (" + "; ".join(f"{n}: {ph['name']}" for n, ph in enumerate(data["phases"], 1))
                 + f"). Commit {env['commit']}.",
                 color=fg, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=80, facecolor=bg)
    plt.close(fig)
    return True


def markdown(data: dict[str, Any], plotted: bool) -> str:
    env = data["environment"]
    lines = ["# Dashboard snapshot (stand-in for Grafana)", "",
             "No Docker engine exists on the machine that made this, so Grafana's image could not run. Instead a "
             f"real {data['prometheus_version']} scraped a real server started by the container's entrypoint "
             "(`deploy/entrypoint.sh`, the bundled demo checkpoint) while `elas-loadtest` drove three phases of "
             "load, and every panel's PromQL from `deploy/grafana/dashboards/elas-serve.json` was evaluated with "
             f"`query_range` (step {data['step_s']:g} s, `$__rate_interval` = {data['rate_interval']}, all models).",
             "", f"Environment: {env['device']}, torch {env['torch']}, server flags `{' '.join(data['server_args'])}`, "
             f"commit `{env['commit']}`, {env['date']}. Made by `{data['command']}`; raw: `dashboard_snapshot.json`.",
             "", "## Load phases", "", "| phase | ok / failed | req/s | output tok/s | median TTFT ms | median ITL ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for ph in data["phases"]:
        lines.append(f"| {ph['name']} | {ph['completed']} / {ph['failed']} | {ph['request_throughput']:.2f} | "
                     f"{ph['output_throughput']:.1f} | {ph['median_ttft_ms']:.1f} | {ph['median_itl_ms']:.1f} |")
    lines += ["", "## Every panel's query returned data", "",
              "| panel | series | points | max | last |", "|---|---|---:|---:|---:|"]
    for p in data["panels"]:
        for t in p["targets"]:
            for s in t["series"] or [{"metric": {}, "values": []}]:
                vals = [v for _, v in s["values"] if math.isfinite(v)]
                fmt = (lambda v: f"{v:.4g}") if vals else (lambda v: "n/a")
                lines.append(f"| {p['title']} | {legend(t['legend'], s['metric'])} | {len(s['values'])} | "
                             f"{fmt(max(vals) if vals else 0)} | {fmt(vals[-1] if vals else 0)} |")
    lines += ["", "Units as in the dashboard: seconds for latencies, fractions (0-1) for KV usage, hit rate and "
              "density, per second for rates.", ""]
    if plotted:
        lines += ["![the dashboard's panels, drawn with matplotlib](dashboard_snapshot.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase-seconds", type=float, default=40.0)
    ap.add_argument("--scrape-interval", type=float, default=2.0, help="seconds")
    ap.add_argument("--quick", action="store_true", help="8-second phases (checks the script, not a snapshot)")
    ap.add_argument("--out", type=Path, default=DOCS)
    args = ap.parse_args(argv)
    seconds = 8.0 if args.quick else args.phase_seconds
    step = args.scrape_interval
    rate_interval = f"{4 * step:g}s"  # Grafana's $__rate_interval floor: four scrape intervals
    out = subprocess.run(["prometheus", "--version"], capture_output=True, text=True).stdout  # "prometheus, version X (...)"
    version = "Prometheus " + out.split("version", 1)[1].split("(")[0].strip()
    port = free_port()
    env = {"ELAS_HOST": "127.0.0.1", "ELAS_PORT": str(port),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with tempfile.TemporaryDirectory() as tmp:
        with ServeProcess([str(ROOT / "deploy" / "entrypoint.sh"), *SERVER_ARGS], port, Path(tmp) / "server.log",
                          env=env, timeout=300) as server, \
                promstack.Prometheus(f"127.0.0.1:{port}", free_port(), Path(tmp) / "prom", f"{step:g}s") as prom:
            prom.wait_for_scrapes(2)
            print(f"server {server.url}, {version} at {prom.url}; load phases of {seconds:g} s:")
            phases = run_phases(server.url, seconds, pause=3 * step)
            prom.wait_for_scrapes(2)
            start, end = phases[0]["start"] - 4 * step, time.time()
            panels = snapshot(prom, start, end, step, rate_interval)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = {"environment": environment(device), "prometheus_version": version, "server_args": SERVER_ARGS,
            "step_s": step, "rate_interval": rate_interval, "phase_seconds": seconds,
            "command": shlex.join(["python", "benchmarks/dashboard_snapshot.py", *(argv or sys.argv[1:])]),
            "phases": phases, "panels": panels}
    args.out.mkdir(parents=True, exist_ok=True)
    plotted = plot(data, args.out / "dashboard_snapshot.png")
    path = write_results("dashboard_snapshot", data, markdown(data, plotted), args.out)
    empty = [f"{p['title']} / {t['legend']}" for p in panels for t in p["targets"] if not t["series"]]
    for p in panels:
        for t in p["targets"]:
            for s in t["series"]:
                vals = [v for _, v in s["values"] if math.isfinite(v)]
                print(f"  {p['title'][:44]:44s} {legend(t['legend'], s['metric'])[:16]:16s} "
                      f"max {max(vals) if vals else float('nan'):.4g}")
    print(f"wrote {path}" + (", the .md and the .png" if plotted else " and the .md (no PNG: matplotlib missing)"))
    if empty:
        print(f"no data for: {', '.join(empty)}")
    return 1 if empty else 0


if __name__ == "__main__":
    sys.exit(main())
