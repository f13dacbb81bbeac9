"""The bundled demo checkpoint: install it from a finished run, evaluate it, show samples.

`--install RUN_DIR` copies the checkpoint files of a finished `elas-serve train` run (config.json,
model.safetensors, tokenizer.json, training_state.json) into elas_serve/assets/demo (refusing more
than 15 MB). Then the installed checkpoint is loaded the way the server loads it (float32 on CPU),
evaluated on the whole held-out novel (default data/austen/heldout: Persuasion, never trained on),
and asked for a few completions. Writes docs/benchmarks/demo_checkpoint.json and the markdown made
from it, and copies the run's loss curve next to them.

Run: python benchmarks/train_demo.py --install runs/demo
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elas_serve import LLM, SamplingParams  # noqa: E402
from elas_serve.models import load_model  # noqa: E402
from elas_serve.tokenizer import Tokenizer
from elas_serve.train.data import TokenSplit, encode_documents, read_texts
from elas_serve.train.evaluate import evaluate
from elas_serve.utils import DEMO_CHECKPOINT

from common import DOCS, ROOT, environment  # noqa: E402

FILES = ("config.json", "model.safetensors", "tokenizer.json", "training_state.json")
MAX_BYTES = 15_000_000
PROMPTS = [("It is a truth universally", 0.0, None), ("Mr. Darcy", 0.8, 1),
           ("\"My dear Emma,\" said", 0.8, 2)]


def install(run: Path) -> None:
    size = sum((run / f).stat().st_size for f in FILES)
    if size > MAX_BYTES:
        raise SystemExit(f"{run}: {size:,} bytes, more than the {MAX_BYTES:,} a demo may take")
    DEMO_CHECKPOINT.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copyfile(run / f, DEMO_CHECKPOINT / f)
    if (run / "loss_curve.png").exists():
        shutil.copyfile(run / "loss_curve.png", DOCS / "demo_loss_curve.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--install", type=Path, default=None, help="finished run to install first")
    p.add_argument("--heldout", default=str(ROOT / "data" / "austen" / "heldout"))
    p.add_argument("--max-tokens", type=int, default=60)
    args = p.parse_args()
    DOCS.mkdir(parents=True, exist_ok=True)
    if args.install:
        install(args.install)
    model = load_model(DEMO_CHECKPOINT, torch.float32, "cpu")
    tok = Tokenizer.from_path(DEMO_CHECKPOINT, model.config.eos_token_ids)
    state = json.loads((DEMO_CHECKPOINT / "training_state.json").read_text())
    docs = read_texts([args.heldout], "held-out corpus")
    ids = encode_documents(tok, [text for _, text in docs])
    split = TokenSplit(np.asarray(ids, dtype=np.int64),
                       sum(len(text.encode("utf-8")) for _, text in docs))
    t0 = time.perf_counter()
    res = evaluate(model, split, state["train_config"]["seq_len"], 16, torch.device("cpu"))
    llm = LLM(DEMO_CHECKPOINT)  # samples as the server makes them
    samples = [{"prompt": pr, "temperature": t, "seed": s,
                "text": pr + llm.generate(pr, SamplingParams(temperature=t, seed=s, max_tokens=args.max_tokens),
                                          use_tqdm=False)[0].outputs[0].text} for pr, t, s in PROMPTS]
    sizes = {f: (DEMO_CHECKPOINT / f).stat().st_size for f in FILES}
    result = {
        "checkpoint": "elas_serve/assets/demo", "bytes": sizes, "total_bytes": sum(sizes.values()),
        "num_parameters": state["num_parameters"], "train_config": state["train_config"],
        "training": {k: state[k] for k in ("global_step", "tokens_seen", "elapsed_s", "world_size")},
        "heldout_files": [str(pth.relative_to(ROOT)) if pth.is_relative_to(ROOT) else str(pth)
                          for pth, _ in docs],
        "heldout_eval": res.to_dict(), "heldout_bytes": split.num_bytes,
        "eval_seconds": time.perf_counter() - t0, "samples": samples,
        "env": environment(torch.device("cpu"))}
    (DOCS / "demo_checkpoint.json").write_text(json.dumps(result, indent=1) + "\n")
    (DOCS / "demo_checkpoint.md").write_text(render(result))
    print(f"demo checkpoint: {result['num_parameters']:,} parameters, {result['total_bytes']:,} "
          f"bytes; held-out ({', '.join(result['heldout_files'])}): loss {res.loss:.4f}, "
          f"perplexity {res.perplexity:.2f}, bits/byte {res.bits_per_byte:.4f} over "
          f"{res.tokens:,} tokens")
    for s in samples:
        print(f"--- {s['prompt']!r} (temperature {s['temperature']}, seed {s['seed']})\n{s['text']}")


def render(r: dict) -> str:
    c, e, t = r["train_config"], r["heldout_eval"], r["training"]
    cmd = ("elas-serve train --data data/austen/train --eval-data data/austen/heldout "
           f"--preset {c['preset']} --vocab-size {c['vocab_size']} --seq-len {c['seq_len']} "
           f"--batch-size {c['batch_size']} --max-steps {c['max_steps']} --warmup-steps "
           f"{c['warmup_steps']} --lr {c['lr']:g} --dense-warmup-steps {c['dense_warmup_steps']} "
           f"--eval-interval {c['eval_interval']} --save-interval {c['save_interval']} "
           f"--seed {c['seed']} --save-dtype {c['save_dtype']} --num-threads {c['num_threads']} "
           f"--out runs/demo")
    lines = [
        "# The bundled demo checkpoint", "",
        f"Made by `python benchmarks/train_demo.py --install runs/demo` from `demo_checkpoint.json` "
        f"(commit {r['env']['commit']}, {r['env']['date']}; torch {r['env']['torch']}, "
        f"Python {r['env']['python']}, CPU).", "",
        "Reproduce it (2 CPU cores; corpus from `elas-serve data`):", "", "```",
        "elas-serve data", cmd, "python benchmarks/train_demo.py --install runs/demo", "```", "",
        f"- Model: ELAS preset `{c['preset']}`: {r['num_parameters']:,} parameters, LORO low-rank "
        f"projections, squared-ReLU FFN with 2:4 activation sparsity (dense for the first "
        f"{c['dense_warmup_steps']} steps), byte-level BPE trained on the five training novels.",
        f"- Training: {t['global_step']} steps, {t['tokens_seen']:,} tokens, "
        f"{t['elapsed_s'] / 60:.1f} min wall time on this machine (shared CPU).",
        f"- Files: {r['total_bytes']:,} bytes in total (bfloat16 weights).", "",
        f"Held-out novel ({', '.join(r['heldout_files'])}, {r['heldout_bytes']:,} bytes, never "
        f"seen in training), whole text, loaded in float32 as the server does:", "",
        "| tokens | loss (nats/token) | perplexity | bits per byte |", "|---|---|---|---|",
        f"| {e['tokens']:,} | {e['loss']:.4f} | {e['perplexity']:.2f} | {e['bits_per_byte']:.4f} |",
        "", "Samples:", ""]
    for s in r["samples"]:
        how = "greedy" if s["temperature"] == 0 else f"temperature {s['temperature']}, seed {s['seed']}"
        lines += [f"*{how}:*", "", "```", s["text"], "```", ""]
    lines += ["![demo loss curve](demo_loss_curve.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
