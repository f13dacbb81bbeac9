"""End-to-end offline generation: an ELAS checkpoint on our engine (each FFN backend) against a
dense LLaMA of the same shape on our engine and on Hugging Face transformers `generate`.

Random checkpoints at a preset shape (elas_serve/train/presets.py) are written to a temporary
directory: the ELAS one (LORO low-rank, squared ReLU + 2:4, as the preset trains it) and a dense
full-rank SwiGLU LLaMA with the same hidden size, layers, heads, vocabulary and SwiGLU width. Each
engine generates the same greedy workload: B prompts of --input-len random token ids, exactly
--output-len tokens each. Decode tok/s = B * (output_len - 1) / (T(output_len) - T(1)): the time
of a 1-token run (prefill) is subtracted, for both engines alike. Both run in this process with
the same torch threads, their timings interleaved (best of --repeats rounds: see `run`).
Writes docs/benchmarks/e2e_<device>_<preset>.{json,md}.

Run: python benchmarks/bench_e2e.py --preset 60m --batch 1,8,32 [--device cpu] [--threads 2] [--clock cpu]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elas_serve import LLM, SamplingParams  # noqa: E402
from elas_serve.models import save_checkpoint  # noqa: E402
from elas_serve.train.config import TrainConfig  # noqa: E402
from elas_serve.train.presets import build_model  # noqa: E402
from elas_serve.utils import DEMO_CHECKPOINT  # noqa: E402

from common import DOCS, environment, write_results  # noqa: E402

VOCAB = 32000  # LLaMA's, as the presets train; prompts draw ids the demo tokenizer knows


def write_checkpoints(preset: str, root: Path, max_len: int) -> dict[str, Path]:
    """{"elas": dir, "dense": dir}: random weights at `preset`'s shape."""
    out = {}
    for name, kw in (("elas", dict(ffn="relu2", lowrank_scope="all")), ("dense", dict(ffn="swiglu", lowrank_scope="none"))):
        cfg = TrainConfig(data=["-"], out_dir=str(root), preset=preset, max_position_embeddings=max_len,
                          seq_len=min(256, max_len), **kw)
        model = build_model(cfg, VOCAB, eos_token_id=0, device=torch.device("cpu"))
        out[name] = save_checkpoint(model, root / name, tokenizer_file=DEMO_CHECKPOINT / "tokenizer.json")
        del model
    return out


def prompts_of(batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 4096, (batch, length), generator=g).tolist()


# NOTE: `--clock cpu` times with the process's CPU time: on a machine shared with other processes
# it leaves out the time they take the cores from us (with one torch thread it equals the wall
# time of an idle machine; with more, spinning OpenMP threads count too)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def time_ours(llm: LLM, prompts: list[list[int]], output_len: int, repeats: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    times = []
    for _ in range(repeats):
        t0 = clock()
        out = llm.generate(prompts, params, use_tqdm=False)
        times.append(clock() - t0)
        assert all(len(r.outputs[0].token_ids) == output_len for r in out)
    return statistics.median(times)


def time_hf(model, prompts: list[list[int]], output_len: int, repeats: int, device: torch.device) -> float:
    ids = torch.tensor(prompts, device=device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                                 min_new_tokens=output_len, do_sample=False, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - t0)
        assert out.shape[1] == ids.shape[1] + output_len
    return statistics.median(times)


def decode_tok_s(batch: int, output_len: int, t_full: float, t_one: float) -> float:
    return batch * (output_len - 1) / max(t_full - t_one, 1e-9)


def run(preset: str, batches: list[int], input_len: int, output_len: int, device: str, dtype: str,
        backends: list[str], threads: int | None, repeats: int, with_hf: bool = True,
        clock_name: str = "wall", enforce_eager: bool = False) -> dict:
    """The whole comparison (also the GPU suite's end-to-end stage); returns the results dict.

    NOTE: every engine is built first and the timings interleave: for each batch, `repeats` rounds
    each time every engine once (the full run, then the 1-token run), and each engine keeps its
    best round. On a shared machine the load of other processes changes over minutes; timing the
    engines one after the other let it bias their ratios (ELAS over transformers at batch 1: 1.22x,
    then 0.93x in the next run, after a change that only made its mask faster), while a slowdown
    only ever adds time, so the best of interleaved rounds compares them under like conditions.
    """
    global clock
    clock = CLOCKS[clock_name]
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = write_checkpoints(preset, Path(tmp), input_len + output_len + 8)
        timers = []  # (row fields, timing function (prompts, output_len) -> seconds)
        for model_name, backend in [("elas", b) for b in backends] + [("dense", "dense")]:
            llm = LLM(model=ckpts[model_name], device=device, dtype=dtype, ffn_backend=backend,
                      max_num_seqs=max(batches), max_model_len=input_len + output_len + 8, cpu_threads=threads,
                      num_kv_blocks=max(batches) * (-(-(input_len + output_len + 8) // 16)) + 1,
                      enforce_eager=enforce_eager)
            # NOTE: timed once the compiled decoder serves (the CPU compiles it in the background)
            compiled = llm.core.runner.decoder.wait(1800)
            timers.append(({"engine": "elas-serve", "model": model_name, "ffn_backend": backend, "compiled": compiled},
                           lambda p, n, llm=llm: time_ours(llm, p, n, 1)))
        if with_hf:
            from transformers import LlamaForCausalLM
            hf = LlamaForCausalLM.from_pretrained(ckpts["dense"], dtype=getattr(torch, dtype if dtype != "auto" else (
                "bfloat16" if dev.type == "cuda" else "float32"))).to(dev).eval()
            timers.append(({"engine": "transformers", "model": "dense", "ffn_backend": None},
                           lambda p, n: time_hf(hf, p, n, 1, dev)))
        for _, timer in timers:
            timer(prompts_of(1, input_len, 0), 2)  # warm-up
        bar = tqdm(total=len(batches) * repeats, desc=f"e2e {preset}")
        by_batch = {}
        for b in batches:
            prompts = prompts_of(b, input_len, b)
            times = [([], []) for _ in timers]  # (full runs, 1-token runs) per engine
            for _ in range(repeats):
                for (_, timer), (full, one) in zip(timers, times):
                    full.append(timer(prompts, output_len))
                    one.append(timer(prompts, 1))
                bar.update()
            by_batch[b] = times
        bar.close()
        for i, (fields, _) in enumerate(timers):
            for b in batches:
                full, one = by_batch[b][i]
                rows.append({**fields, "batch": b, "t_full_s": min(full), "t_one_s": min(one),
                             "decode_tok_s": decode_tok_s(b, output_len, min(full), min(one))})
        del timers
        gc.collect()
    hf_rate = {r["batch"]: r["decode_tok_s"] for r in rows if r["engine"] == "transformers"}
    for r in rows:
        if r["batch"] in hf_rate:
            r["over_transformers"] = r["decode_tok_s"] / hf_rate[r["batch"]]
    return {"preset": preset, "device": device, "dtype": dtype, "input_len": input_len, "output_len": output_len,
            "threads": torch.get_num_threads(), "repeats": repeats, "clock": clock_name, "results": rows}


def markdown(data: dict) -> str:
    env = data["environment"]
    clock_name = "process CPU" if data.get("clock") == "cpu" else "wall"
    lines = [f"# End to end: ELAS {data['preset']} vs a dense LLaMA of its shape ({env['device']})", "",
             f"Random weights, {data['input_len']} prompt + {data['output_len']} output tokens per sequence, greedy, "
             f"{data['dtype']}, {data['threads']} torch threads, best of {data['repeats']} rounds interleaving the "
             f"engines, {clock_name} time; decode tok/s excludes "
             f"the prefill (a 1-token run's time is subtracted). torch {env['torch']}, commit {env['commit']}, "
             f"{env['date']}.", "",
             "| engine | model | FFN backend | compiled | batch | decode tok/s | / transformers (dense) |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in data["results"]:
        ratio = f"{r['over_transformers']:.2f}x" if "over_transformers" in r else ""
        lines.append(f"| {r['engine']} | {r['model']} | {r['ffn_backend'] or ''} | {r.get('compiled', '')} | {r['batch']} | "
                     f"{r['decode_tok_s']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="60m")
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--backends", default=None, help="ELAS FFN backends (default: dense on CPU; every one on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both engines (default: torch's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--enforce-eager", action="store_true", help="our engine without torch.compile / CUDA graphs")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time, or the process's CPU time (a shared machine's other load left out)")
    p.add_argument("--out", type=Path, default=DOCS)
    args = p.parse_args(argv)
    backends = args.backends.split(",") if args.backends else (
        ["dense"] if args.device == "cpu" else ["dense", "sparse24", "fused", "auto"])
    data = run(args.preset, [int(b) for b in args.batch.split(",")], args.input_len, args.output_len, args.device,
               args.dtype, backends, args.threads, args.repeats, not args.no_transformers, args.clock, args.enforce_eager)
    data["environment"] = environment(torch.device(args.device))
    path = write_results(f"e2e_{torch.device(args.device).type}_{args.preset}", data, markdown(data), args.out)
    print(markdown(data))
    print(json.dumps({"results": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
