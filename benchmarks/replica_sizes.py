"""What one engine replica holds, per preset shape: weight bytes and KV-cache bytes per token (and
per full-length sequence), for the ELAS checkpoint and the dense LLaMA of the same shape.

Arithmetic from the model definitions (parameters counted on meta tensors, no weights made), not a
measurement. Writes docs/benchmarks/replica_sizes.{json,md}. Run: python benchmarks/replica_sizes.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elas_serve.models import ElasForCausalLM  # noqa: E402
from elas_serve.train.config import TrainConfig  # noqa: E402
from elas_serve.train.presets import PRESETS, build_model_config  # noqa: E402

from common import environment, write_results  # noqa: E402

VOCAB = 32000
BYTES = {"bfloat16": 2, "float32": 4}


def sizes(preset: str, ffn: str, scope: str) -> dict:
    config, specs = build_model_config(TrainConfig(data=["-"], out_dir="-", preset=preset, ffn=ffn, lowrank_scope=scope),
                                       VOCAB, 0)
    with torch.device("meta"):
        model = ElasForCausalLM(config, specs)
    params = sum(p.numel() for p in model.parameters())
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim  # elements
    return {"preset": preset, "model": "elas" if ffn == "relu2" else "dense", "params": params,
            "max_model_len": config.max_position_embeddings,
            **{f"weights_{d}_mib": params * b / 2 ** 20 for d, b in BYTES.items()},
            **{f"kv_per_token_{d}_kib": kv_per_token * b / 2 ** 10 for d, b in BYTES.items()},
            "kv_per_sequence_bfloat16_mib": kv_per_token * 2 * config.max_position_embeddings / 2 ** 20}


def main() -> int:
    rows = [sizes(p, ffn, scope) for p in PRESETS for ffn, scope in (("relu2", "all"), ("swiglu", "none"))]
    data = {"environment": environment(torch.device("cpu")), "vocab_size": VOCAB, "rows": rows}
    lines = ["# What one replica holds (arithmetic, not a measurement)", "",
             f"Parameters counted from the model definitions at each preset (vocabulary {VOCAB}); weights in bf16 "
             "(the CUDA default) and fp32 (the CPU default); the KV cache per token and per full-length sequence "
             "(bf16). Made by `python benchmarks/replica_sizes.py`.", "",
             "| preset | model | parameters | weights bf16 (MiB) | weights fp32 (MiB) | KV bf16 per token (KiB) | "
             "KV bf16 per max-length sequence (MiB) |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['model']} | {r['params']:,} | {r['weights_bfloat16_mib']:.1f} | "
                     f"{r['weights_float32_mib']:.1f} | {r['kv_per_token_bfloat16_kib']:.1f} | "
                     f"{r['kv_per_sequence_bfloat16_mib']:.1f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    print(write_results("replica_sizes", data, md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
