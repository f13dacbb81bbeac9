"""Offline engine throughput and latency versus the number of concurrent sequences.

For each concurrency c, c requests (distinct random prompts of --input-len tokens, exactly
--output-len greedy tokens each: `ignore_eos`) are submitted at once to one engine and run to
completion; output tokens/s is total output tokens over the wall time of that round. Per-request
TTFT, TPOT (= (last token - first token) / (n - 1)) and end-to-end latency come from the engine's
own timestamps. Each level runs --rounds times (fresh prompts each time); the table reports the
round of median throughput, the JSON keeps every round. Writes docs/benchmarks/engine_<device>.{json,md,png}.

Run: python benchmarks/bench_engine.py [--model DIR] [--concurrency 1,2,4,8,16,32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elas_serve import LLM  # noqa: E402
from elas_serve.sampling_params import SamplingParams  # noqa: E402
from elas_serve.utils import DEMO_CHECKPOINT  # noqa: E402

from common import DOCS, environment, write_results  # noqa: E402


def run_round(llm: LLM, prompts: list[list[int]], output_len: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    first, last, done = {}, {}, {}
    start = time.monotonic()
    for i, out in llm.iter_outputs(prompts, [params] * len(prompts)):
        now = time.monotonic()
        if out.outputs[0].token_ids:
            first.setdefault(i, now)
            last[i] = now
        if out.finished:
            done[i] = now
    wall = time.monotonic() - start
    ttft = [first[i] - start for i in range(len(prompts))]
    tpot = [(last[i] - first[i]) / (output_len - 1) for i in range(len(prompts))]
    e2e = [done[i] - start for i in range(len(prompts))]
    return {"concurrency": len(prompts), "wall_s": wall,
            "output_tokens": len(prompts) * output_len,
            "output_tokens_per_s": len(prompts) * output_len / wall,
            "mean_ttft_ms": 1e3 * statistics.mean(ttft), "mean_tpot_ms": 1e3 * statistics.mean(tpot),
            "median_tpot_ms": 1e3 * statistics.median(tpot), "mean_e2el_ms": 1e3 * statistics.mean(e2e),
            "max_e2el_ms": 1e3 * max(e2e)}


def markdown(data: dict) -> str:
    env, rows = data["environment"], data["results"]
    lines = [f"# Engine throughput vs concurrency ({env['device']})", "",
             f"Model `{data['model']}`, {data['input_len']} prompt tokens, {data['output_len']} output tokens "
             f"per request, greedy, dtype {data['dtype']}, FFN backend `{data['ffn_backend']}`; each row is "
             f"the median-throughput round of {data['rounds']} (all rounds in the JSON). "
             f"torch {env['torch']}, triton {env['triton']}, {env['cpu_threads']} CPU threads, commit "
             f"`{env['commit']}`, {env['date']}. Raw: `{data['stem']}.json`; made by "
             "`benchmarks/bench_engine.py`.", "",
             "| concurrent seqs | output tok/s | vs 1 | mean TTFT ms | mean TPOT ms | mean E2EL ms |",
             "|---:|---:|---:|---:|---:|---:|"]
    base = rows[0]["output_tokens_per_s"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['output_tokens_per_s']:.1f} | "
                     f"{r['output_tokens_per_s'] / base:.2f}x | {r['mean_ttft_ms']:.1f} | "
                     f"{r['mean_tpot_ms']:.2f} | {r['mean_e2el_ms']:.1f} |")
    return "\n".join(lines + ["", f"![throughput]({data['stem']}.png)", ""])


def plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = data["results"]
    c = [r["concurrency"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(c, [r["output_tokens_per_s"] for r in rows], "o-")
    a.set(xscale="log", xlabel="concurrent sequences", ylabel="output tokens/s", title="throughput")
    b.plot(c, [r["mean_tpot_ms"] for r in rows], "o-", color="tab:orange")
    b.set(xscale="log", xlabel="concurrent sequences", ylabel="ms", title="mean time per output token")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(f"elas-serve engine on {data['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEMO_CHECKPOINT))
    ap.add_argument("--concurrency", default="1,2,4,8,16,32")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--ffn-backend", default="auto")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpu-threads", type=int, default=None, help="default: the engine's (all cores but one)")
    ap.add_argument("--stem", default=None, help="output file stem (default engine_<device type>)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    engine = LLM(model=args.model, device=args.device, dtype=args.dtype, ffn_backend=args.ffn_backend,
                 max_num_seqs=max(levels), max_model_len=args.input_len + args.output_len,
                 cpu_threads=args.cpu_threads)
    info = engine.core.model_info
    device = torch.device(info.device)
    vocab = info.vocab_size
    g = torch.Generator().manual_seed(0)
    run_round(engine, [torch.randint(1, vocab, (args.input_len,), generator=g).tolist()], 8)  # warm-up
    results = []
    for c in levels:
        rounds = [run_round(engine, [torch.randint(1, vocab, (args.input_len,), generator=g).tolist()
                                     for _ in range(c)], args.output_len) for _ in range(args.rounds)]
        rounds.sort(key=lambda r: r["output_tokens_per_s"])
        r = {**rounds[len(rounds) // 2], "rounds_output_tokens_per_s": [x["output_tokens_per_s"] for x in rounds]}
        results.append(r)
        print(f"concurrency {c:3d}: {r['output_tokens_per_s']:8.1f} output tok/s (median of "
              f"{', '.join(f'{x:.1f}' for x in r['rounds_output_tokens_per_s'])}), "
              f"TPOT {r['mean_tpot_ms']:.2f} ms, TTFT {r['mean_ttft_ms']:.1f} ms", flush=True)
    stem = args.stem or f"engine_{device.type}"
    data = {"stem": stem, "model": Path(args.model).name, "input_len": args.input_len,
            "output_len": args.output_len, "dtype": info.dtype, "ffn_backend": info.ffn_backend, "rounds": args.rounds, "environment": environment(device),
            "results": results}
    if 1 in levels and 16 in levels:
        ratio = results[levels.index(16)]["output_tokens_per_s"] / results[levels.index(1)]["output_tokens_per_s"]
        data["ratio_16_vs_1"] = ratio
        print(f"16 concurrent vs 1: {ratio:.2f}x output tokens/s")
    path = write_results(stem, data, markdown(data))
    plot(data, DOCS / f"{stem}.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
