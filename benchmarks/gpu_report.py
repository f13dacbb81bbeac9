"""The markdown of a `gpu_suite.py` result: one table of ratios, then each stage's own summary.

Ratios: fused / dense FFN by M (dense = the epilogue-fused chain, graph replays), sparse / dense end
to end (decode tok/s of each FFN backend over `dense` on the ELAS checkpoint), ours / transformers
(our engine over `generate` on the dense LLaMA of the same shape, and the ELAS checkpoint over it),
ours / floor (batch-1 decode step time over the weight-bytes floor). Made by
`python benchmarks/gpu_suite.py --report RESULT.json`; every number comes from the result file.
"""

from __future__ import annotations

from typing import Any


def _ffn_rows(ffn: dict) -> list[str]:
    rows = ffn.get("rows", [])
    out = []
    for model in ffn.get("shapes", {}):
        for m in ffn.get("tokens", []):
            t = {r["variant"]: r["median_us"] for r in rows if r["model"] == model and r["tokens"] == m
                 and r.get("mode") == "graph" and "median_us" in r}
            if "fused" in t and "dense" in t:
                out.append(f"| FFN {model}, M={m}: dense / fused time | {t['dense'] / t['fused']:.2f}x |")
    return out


def _e2e_rows(e2e: dict) -> list[str]:
    out = []
    for preset, result in e2e.items():
        rows = result.get("results", [])
        dense = {r["batch"]: r["decode_tok_s"] for r in rows if r["engine"] == "elas-serve" and r["model"] == "elas"
                 and r["ffn_backend"] == "dense"}
        for r in rows:
            if r["engine"] == "elas-serve" and r["model"] == "elas" and r["ffn_backend"] != "dense" \
                    and r["batch"] in dense:
                out.append(f"| e2e {preset} batch {r['batch']}: {r['ffn_backend']} / dense decode tok/s | "
                           f"{r['decode_tok_s'] / dense[r['batch']]:.2f}x |")
        for r in rows:
            if r["engine"] == "elas-serve" and "over_transformers" in r:
                out.append(f"| e2e {preset} batch {r['batch']}: ours ({r['model']}, {r['ffn_backend']}) / transformers "
                           f"(dense) | {r['over_transformers']:.2f}x |")
    return out


def _step_rows(step: dict) -> list[str]:
    out = []
    for r in step.get("floor", []):
        mode = "compiled + CUDA graphs" if r.get("cuda_graphs") else ("compiled" if r.get("compiled") else "eager")
        out.append(f"| step {r.get('model', '')} batch 1, {mode}: "
                   f"decode step / weight-bytes floor | {r['over_floor']:.2f}x |")
    return out


def markdown(data: dict[str, Any]) -> str:
    env, stages = data["environment"], data["stages"]
    lines = [f"# GPU suite: {env['device']}", "",
             f"Driver {env.get('driver')}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
             f"commit {env['commit']}, {env['date']}." + (" **Dry run (CPU-sized): no GPU figure.**"
                                                         if data.get("dry_run") else ""), "",
             "| stage | ok | seconds |", "|---|---|---:|"]
    lines += [f"| {name} | {'yes' if s.get('ok') else '**no**'} | {s.get('wall_s', 0):.1f} |" for name, s in stages.items()]
    ratios = []
    if stages.get("ffn", {}).get("ok"):
        ratios += _ffn_rows(stages["ffn"]["result"])
    if stages.get("e2e", {}).get("ok"):
        ratios += _e2e_rows(stages["e2e"]["result"])
    if stages.get("step", {}).get("ok"):
        ratios += _step_rows(stages["step"]["result"])
    lines += ["", "## Ratios", ""]
    lines += (["| what | ratio |", "|---|---:|"] + ratios) if ratios else ["(none: no stage produced GPU timings)"]
    for name in ("tests", "kernels"):
        s = stages.get(name, {}).get("result", {})
        if "tests" in s:
            lines += ["", f"## {name}: {s['tests']} tests, {s['failures']} failures, {s['errors']} errors, "
                          f"{s['skipped']} skipped"] + [f"- `{f}`" for f in s.get("failed", [])]
    for name, s in stages.items():
        if not s.get("ok"):
            lines += ["", f"## {name} failed", "", "```", (s.get("error") or s.get("log_tail") or "")[-2000:], "```"]
    return "\n".join(lines) + "\n"
