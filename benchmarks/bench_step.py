"""The decode step: ops and kernels per step, decode speed compiled vs eager, host time, the floor.

For each model (the bundled demo, and random checkpoints at preset shapes written as
benchmarks/bench_e2e.py writes them), on one `EngineCore` with the compiled decoder:
- `ops_per_layer_eager`: aten ops dispatched by one eager decode forward at batch 1 (a
  TorchDispatchMode counts them), divided by the number of layers;
- `kernels_per_layer_compiled`: kernel launches in the compiled T = 1 graph's generated code
  (inductor's fused kernels, extern GEMMs and custom ops such as attention), per layer;
- decode tok/s at each batch, the compiled and the eager decoder alternating on the same core,
  engine and KV cache (`runner.decoder.compiled` switched off for the eager rounds: exactly the
  `--enforce-eager` path); 128-token random prompts, prefilled first, then timed decode steps;
- `host_ms`: per decode step, step time minus the decoder's forward (scheduling, input building,
  sampling, output processing), at batch 1, 64 and 256 on the demo model, and minor page faults
  per step (the allocator's churn);
- `floor`: at batch 1, the decode step against the weight-bytes floor (bytes of all weights read
  once / measured copy bandwidth of this device), with and without CUDA graphs on CUDA;
- `greedy_identical`: the demo model's greedy tokens compiled vs eager.
The sampler's own speed (batch 256, 32k vocabulary) is `benchmarks/bench_sampler.py`.
Writes docs/benchmarks/step_<device>.{json,md}.

Run: python benchmarks/bench_step.py [--device cpu] [--presets 60m] [--batches 1,16] [--quick]
"""

from __future__ import annotations

import argparse
import re
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elas_serve import SamplingParams  # noqa: E402
from elas_serve.config import EngineConfig  # noqa: E402
from elas_serve.engine.compilation import warmup_inputs  # noqa: E402
from elas_serve.engine.core import EngineCore  # noqa: E402
from elas_serve.engine.messages import EngineCoreRequest  # noqa: E402
from elas_serve.models.attention import forward_context  # noqa: E402
from elas_serve.utils import DEMO_CHECKPOINT  # noqa: E402

from common import environment, write_results  # noqa: E402

PROMPT_LEN = 128


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def ops_per_layer_eager(core: EngineCore) -> dict:
    runner = core.runner
    ids, positions, meta = warmup_inputs(runner.kv_caches, 1)
    counter = _CountOps()
    with torch.inference_mode(), forward_context(meta), counter:
        runner.decoder(ids, positions, eager=True)
    layers = core.model.config.num_hidden_layers
    return {"total": sum(counter.ops.values()), "per_layer": sum(counter.ops.values()) / layers,
            "top": counter.ops.most_common(8)}


_LAUNCH = re.compile(r"^\s+(?:\w+ = )?(?:buf\w* = )?(cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+|"
                     r"torch\.ops\.\w+\.\w+(?:\.\w+)?|aten\.\w+(?:\.\w+)?)\(")


def kernels_per_layer_compiled(core: EngineCore) -> dict:
    """Kernel launches in a fresh compile's generated code for T = 1 (caches off, so code is made;
    the Python wrapper, whose calls are parsed here: the engine's C++ one on the CPU calls the same)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    runner = core.runner
    ids, positions, meta = warmup_inputs(runner.kv_caches, 1)
    fn = torch.compile(core.model.model, fullgraph=True, dynamic=False)
    with torch.inference_mode(), forward_context(meta), inductor_config.patch(force_disable_caches=True, cpp_wrapper=False):
        _, codes = run_and_get_code(fn, ids, positions, runner.kv_caches)
    calls = Counter()
    for code in codes:
        body = code.split("def call(", 1)[-1].split("\ndef ", 1)[0]
        for line in body.splitlines():
            m = _LAUNCH.match(line)
            if m:
                calls[m.group(1).split("(")[0] if m.group(1).startswith(("extern", "torch", "aten"))
                      else "fused (inductor)"] += 1
    layers = core.model.config.num_hidden_layers
    return {"total": sum(calls.values()), "per_layer": sum(calls.values()) / layers, "by_kind": dict(calls)}


def make_core(model: Path, device: str, max_num_seqs: int, enforce_eager: bool = False) -> EngineCore:
    max_len = PROMPT_LEN + 64
    blocks = max_num_seqs * (-(-max_len // 16)) + 1
    return EngineCore.from_config(EngineConfig(
        model=model, device=device, max_num_seqs=max_num_seqs, max_model_len=max_len, num_kv_blocks=blocks,
        max_num_batched_tokens=4096, enforce_eager=enforce_eager, enable_prefix_caching=False))


def _add(core: EngineCore, batch: int, max_tokens: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    vocab = min(core.model.config.vocab_size, 4096)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(batch):
        ids = torch.randint(1, vocab, (PROMPT_LEN,), generator=g).tolist()
        core.add_request(EngineCoreRequest(f"r{seed}-{i}", ids, params, max_tokens, [], time.monotonic()))


class _TimedDecoder:
    """Wraps the runner's decoder, summing the seconds its forwards take."""

    def __init__(self, decoder) -> None:
        self.inner, self.seconds = decoder, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        if out.is_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def time_decode(core: EngineCore, batch: int, steps: int, compiled: bool, seed: int) -> dict:
    """Seconds per decode step of `batch` sequences (after their prefill), and its host share."""
    decoder = core.runner.decoder
    saved = decoder.compiled
    if not compiled:
        decoder.compiled = None
    graphs, core.runner.graphs = core.runner.graphs, (core.runner.graphs if compiled else None)
    try:
        _add(core, batch, steps + 2, seed)
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.requests.values()):
            core.step()
        core.step()  # first decode step: warm
        timed = _TimedDecoder(decoder)
        core.runner.decoder = timed
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        for _ in range(steps):
            core.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    finally:
        core.runner.decoder, core.runner.graphs, decoder.compiled = decoder, graphs, saved
        core.abort_all()
    return {"step_ms": total / steps * 1e3, "forward_ms": timed.seconds / steps * 1e3,
            "host_ms": (total - timed.seconds) / steps * 1e3, "decode_tok_s": batch * steps / total,
            "page_faults": faults / steps}


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a 256 MiB device-to-device copy (read + write), median of 5."""
    x = torch.empty(128 << 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    times = []
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        y.copy_(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * x.numel() / statistics.median(times[1:])


def greedy_identical(core: EngineCore, max_tokens: int = 32) -> bool:
    def tokens(compiled: bool) -> list[list[int]]:
        decoder, saved = core.runner.decoder, core.runner.decoder.compiled
        decoder.compiled = saved if compiled else None
        try:
            _add(core, 4, max_tokens, seed=7)
            out: dict[str, list[int]] = {}
            while core.has_unfinished_requests():
                for o in core.step().outputs:
                    out.setdefault(o.request_id, []).extend(o.new_token_ids)
            return [out[k] for k in sorted(out)]
        finally:
            decoder.compiled = saved
    return tokens(True) == tokens(False)


def bench_model(name: str, path: Path, device: str, batches: tuple[int, ...], steps: int, host_batches: tuple[int, ...],
                rounds: int) -> dict:
    # NOTE: counted on an eager core, in a clean compiler state, then reset: the engine's own compile
    # (background, with the inductor cache) must not share guards with the counting compile
    core = make_core(path, device, 1, enforce_eager=True)
    row = {"model": name, "num_layers": core.model.config.num_hidden_layers,
           "ops_eager": ops_per_layer_eager(core), "kernels_compiled": kernels_per_layer_compiled(core)}
    del core
    torch._dynamo.reset()
    t0 = time.monotonic()
    core = make_core(path, device, max(batches + host_batches))
    if not core.runner.decoder.wait(1800):
        raise RuntimeError(f"{name}: the decoder did not compile")
    row["compile_s"] = time.monotonic() - t0
    runs = []
    for b in tqdm(sorted(set(batches + host_batches)), desc=f"step {name}", leave=False):
        for r in range(rounds):
            for compiled in (True, False):
                runs.append({"batch": b, "compiled": compiled, "round": r,
                             **time_decode(core, b, steps if b in batches else max(2, steps // 4), compiled, seed=r)})
    row["decode"] = runs
    weight_bytes = sum(p.numel() * p.element_size() for p in core.model.parameters())
    floor_s = weight_bytes / copy_bandwidth(torch.device(core.runner.device))
    row["weight_bytes"], row["floor_ms"] = weight_bytes, floor_s * 1e3
    row["floor"] = []
    for compiled in (True, False):
        ms = statistics.median(r["step_ms"] for r in runs if r["batch"] == 1 and r["compiled"] == compiled)
        row["floor"].append({"model": name, "compiled": compiled, "cuda_graphs": compiled and core.runner.graphs is not None,
                             "step_ms": ms, "over_floor": ms / (floor_s * 1e3)})
    if name == "demo":
        row["greedy_identical"] = greedy_identical(core)
    return row


def summarize(row: dict) -> list[dict]:
    out = []
    for b in sorted({r["batch"] for r in row["decode"]}):
        med = {c: {k: statistics.median(r[k] for r in row["decode"] if r["batch"] == b and r["compiled"] == c)
                   for k in ("decode_tok_s", "step_ms", "forward_ms", "host_ms", "page_faults")} for c in (True, False)}
        out.append({"batch": b, "compiled": med[True], "eager": med[False],
                    "speedup": med[True]["decode_tok_s"] / med[False]["decode_tok_s"],
                    "forward_speedup": med[False]["forward_ms"] / med[True]["forward_ms"]})
    return out


def run(device: str = "cpu", presets: tuple[str, ...] = ("60m",), batches: tuple[int, ...] = (1, 16),
        host_batches: tuple[int, ...] = (64, 256), steps: int = 32, rounds: int = 3, quick: bool = False) -> dict:
    """The whole benchmark (also the GPU suite's step stage); returns the results dict."""
    from bench_e2e import write_checkpoints

    if quick:  # NOTE: the GPU suite's dry run: every code path, CPU-sized
        presets, batches, host_batches, steps, rounds = (), (1, 2), (), 4, 1
    models = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [("demo", DEMO_CHECKPOINT)] + [
            (f"elas-{p}", write_checkpoints(p, Path(tmp) / p, PROMPT_LEN + 72)["elas"]) for p in presets]
        for name, path in paths:
            row = bench_model(name, path, device, batches, steps, host_batches if name == "demo" else (), rounds)
            row["summary"] = summarize(row)
            models.append(row)
    floor = [f for m in models for f in m["floor"]]
    return {"device": device, "prompt_len": PROMPT_LEN, "steps": steps, "rounds": rounds, "models": models,
            "floor": floor}


def markdown(data: dict) -> str:
    env = data["environment"]
    lines = [f"# The decode step ({env['device']})", "",
             f"torch {env['torch']}, triton {env['triton']}, {env['cpu_threads']} CPU thread(s), commit "
             f"{env['commit']}, {env['date']}. `python benchmarks/bench_step.py`: {data['prompt_len']}-token prompts, "
             f"{data['steps']} timed decode steps, median of {data['rounds']} alternating rounds (compiled, eager).", "",
             "| model | layers | compile (s) | aten ops / layer, eager | kernels / layer, compiled | greedy identical |",
             "|---|---:|---:|---:|---:|---|"]
    for m in data["models"]:
        lines.append(f"| {m['model']} | {m['num_layers']} | {m['compile_s']:.1f} | {m['ops_eager']['per_layer']:.1f} | "
                     f"{m['kernels_compiled']['per_layer']:.1f} | {m.get('greedy_identical', '')} |")
    lines += ["", "Decode: `speedup` is decode tok/s compiled / eager (whole engine steps); `forward` is the "
                  "decoder's forward alone (eager ms / compiled ms); host = step - forward (scheduling, inputs, "
                  "logits, sampling, outputs).", "",
              "| model | batch | compiled tok/s | eager tok/s | speedup | forward speedup | forward ms (compiled) | "
              "forward ms (eager) | host ms (compiled) | host ms (eager) | page faults / step (compiled) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in data["models"]:
        for s in m["summary"]:
            c, e = s["compiled"], s["eager"]
            lines.append(f"| {m['model']} | {s['batch']} | {c['decode_tok_s']:.1f} | {e['decode_tok_s']:.1f} | "
                         f"{s['speedup']:.2f}x | {s['forward_speedup']:.2f}x | {c['forward_ms']:.2f} | "
                         f"{e['forward_ms']:.2f} | {c['host_ms']:.2f} | {e['host_ms']:.2f} | {c['page_faults']:.0f} |")
    lines += ["", "Batch 1 against the weight-bytes floor (all weights read once at the measured copy bandwidth):", "",
              "| model | compiled | CUDA graphs | step ms | floor ms | over floor |", "|---|---|---|---:|---:|---:|"]
    for m in data["models"]:
        for f in m["floor"]:
            lines.append(f"| {m['model']} | {f['compiled']} | {f['cuda_graphs']} | {f['step_ms']:.3f} | "
                         f"{m['floor_ms']:.3f} | {f['over_floor']:.1f}x |")
    for m in data["models"]:
        k = m["kernels_compiled"]["by_kind"]
        lines += ["", f"{m['model']}: kernels in the compiled T = 1 graph by kind: "
                  + ", ".join(f"`{n}` {c}" for n, c in sorted(k.items())) + "; eager's most frequent aten ops: "
                  + ", ".join(f"`{n}` {c}" for n, c in m["ops_eager"]["top"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--presets", default="60m", help="comma-separated preset shapes besides the demo ('' for none)")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = run(args.device, tuple(x for x in args.presets.split(",") if x), tuple(int(b) for b in args.batches.split(",")),
               steps=args.steps, rounds=args.rounds, quick=args.quick)
    data["environment"] = environment(torch.device(args.device))
    md = markdown(data)
    print(md)
    if not args.quick:
        write_results(f"step_{torch.device(args.device).type}", data, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
