"""Test helpers, independent of the package: checkpoints in the ELAS authors' on-disk layout and a
float64 reference forward pass written from the paper's/authors' semantics.

The writer mimics `model.save_pretrained` of the authors' HF-4.28-style LLaMA port (`run_c4.py`):
LlamaConfig fields plus their runtime fields in config.json, LORO factors `weight_in` [in, r] and
`weight_out` [out, r], the persistent `rotary_emb.inv_freq` buffer, untied `lm_head`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Variant:
    name: str
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    intermediate: int = 86  # relu2 width int(1.5 * 86) = 129: not a multiple of 4
    vocab: int = 320
    squ_relu: str | None = "relu2"  # None: plain LLaMA config (no ELAS fields)
    two_by_four: bool = True
    attn_rank: int | None = 16  # None: dense
    mlp_rank: int | None = 24
    tied: bool = False
    fmt: str = "safetensors"  # safetensors | sharded | bin | sharded_bin
    dtype: torch.dtype = torch.float32
    bias: bool = False
    rope_theta: float | None = None
    extra_config: dict = field(default_factory=dict)

    @property
    def ffn_width(self) -> int:
        return int(1.5 * self.intermediate) if self.squ_relu == "relu2" else self.intermediate


def make_config(v: Variant) -> dict:
    cfg = {
        "architectures": ["LLaMAForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": v.hidden, "intermediate_size": v.intermediate,
        "num_attention_heads": v.heads, "num_key_value_heads": v.kv_heads,
        "num_hidden_layers": v.layers, "vocab_size": v.vocab, "rms_norm_eps": 1e-6,
        "initializer_range": 0.02, "max_sequence_length": 1024, "max_position_embeddings": 2048,
        "pad_token_id": -1, "bos_token_id": 0, "eos_token_id": 1, "use_cache": True,
        "tie_word_embeddings": v.tied, "torch_dtype": str(v.dtype).replace("torch.", ""),
        "transformers_version": "4.28.1",
    }
    if v.rope_theta is not None:
        cfg["rope_theta"] = v.rope_theta
    if v.squ_relu is not None:
        cfg.update({"squ_relu": v.squ_relu, "activation_2by4": v.two_by_four,
                    "wandb_sparsityrelu": False, "activation_sparse_method": "naive",
                    "activation_dense_warmup_steps": 1000, "dx_direct_sparse": 1,
                    "dynamic_activation_steps": 10, "activation_calibration_samples": 100,
                    "permute_2by4": True})
    cfg.update(v.extra_config)
    return cfg


def make_weights(v: Variant, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    hd = v.hidden // v.heads
    sd = {"model.embed_tokens.weight": rnd(v.vocab, v.hidden, std=1.0),
          "model.norm.weight": 1 + rnd(v.hidden, std=0.1)}
    if not v.tied:
        sd["lm_head.weight"] = rnd(v.vocab, v.hidden, std=v.hidden ** -0.5)

    def proj(prefix: str, d_in: int, d_out: int, rank: int | None) -> None:
        if rank is None:
            sd[f"{prefix}.weight"] = rnd(d_out, d_in, std=d_in ** -0.5)
        else:
            sd[f"{prefix}.weight_in"] = rnd(d_in, rank, std=d_in ** -0.5)
            sd[f"{prefix}.weight_out"] = rnd(d_out, rank, std=rank ** -0.5)
        if v.bias:
            sd[f"{prefix}.bias"] = rnd(d_out, std=0.1)

    for i in range(v.layers):
        p = f"model.layers.{i}"
        proj(f"{p}.self_attn.q_proj", v.hidden, v.heads * hd, v.attn_rank)
        proj(f"{p}.self_attn.k_proj", v.hidden, v.kv_heads * hd, v.attn_rank)
        proj(f"{p}.self_attn.v_proj", v.hidden, v.kv_heads * hd, v.attn_rank)
        proj(f"{p}.self_attn.o_proj", v.heads * hd, v.hidden, v.attn_rank)
        if v.squ_relu != "relu2":
            proj(f"{p}.mlp.gate_proj", v.hidden, v.ffn_width, v.mlp_rank)
        proj(f"{p}.mlp.up_proj", v.hidden, v.ffn_width, v.mlp_rank)
        proj(f"{p}.mlp.down_proj", v.ffn_width, v.hidden, v.mlp_rank)
        sd[f"{p}.input_layernorm.weight"] = 1 + rnd(v.hidden, std=0.1)
        sd[f"{p}.post_attention_layernorm.weight"] = 1 + rnd(v.hidden, std=0.1)
        sd[f"{p}.self_attn.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, hd, 2) / hd))
    return {k: t.to(v.dtype) if not k.endswith("inv_freq") else t for k, t in sd.items()}


def write_checkpoint(path: Path, v: Variant, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write the variant's checkpoint directory; return its state dict (as stored)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(make_config(v), indent=2))
    sd = make_weights(v, seed)
    if v.fmt == "safetensors":
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    elif v.fmt in ("sharded", "sharded_bin"):
        names = sorted(sd)
        shards = [names[: len(names) // 2], names[len(names) // 2:]]
        ext = "safetensors" if v.fmt == "sharded" else "bin"
        stem = "model" if v.fmt == "sharded" else "pytorch_model"
        weight_map = {}
        for j, shard in enumerate(shards):
            fname = f"{stem}-{j + 1:05d}-of-{len(shards):05d}.{ext}"
            part = {k: sd[k].contiguous() for k in shard}
            if ext == "safetensors":
                save_file(part, str(path / fname), metadata={"format": "pt"})
            else:
                torch.save(part, path / fname)
            weight_map.update({k: fname for k in shard})
        (path / f"{stem}.{ext}.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
             "weight_map": weight_map}))
    elif v.fmt == "bin":
        torch.save(sd, path / "pytorch_model.bin")
    else:
        raise ValueError(v.fmt)
    return sd


# ----------------------------------------------------------------------------- float64 reference

def reference_logits(sd: dict[str, torch.Tensor], cfg: dict, ids: list[int]) -> torch.Tensor:
    """Logits (S, V) in float64 of one sequence, straight from the semantics."""
    w = {k: t.double() for k, t in sd.items()}
    H, Hkv, L = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    D = cfg["hidden_size"] // H
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)
    relu2 = cfg.get("squ_relu") == "relu2"
    two_by_four = relu2 and cfg.get("activation_2by4", False)
    S = len(ids)

    def norm(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight

    def lin(x, prefix):
        if f"{prefix}.weight" in w:
            y = x @ w[f"{prefix}.weight"].T
        else:
            y = (x @ w[f"{prefix}.weight_in"]) @ w[f"{prefix}.weight_out"].T
        return y + w[f"{prefix}.bias"] if f"{prefix}.bias" in w else y

    pos = torch.arange(S, dtype=torch.float64)
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos[:, None] * inv[None, :]  # (S, D/2)
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rope(x):  # (S, h, D): pairs (i, i + D/2) rotate by ang_i
        a, b = x[..., : D // 2], x[..., D // 2:]
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat((a * c - b * s, b * c + a * s), dim=-1)

    x = w["model.embed_tokens.weight"][ids]
    for i in range(L):
        p = f"model.layers.{i}"
        h = norm(x, w[f"{p}.input_layernorm.weight"])
        q = rope(lin(h, f"{p}.self_attn.q_proj").view(S, H, D))
        k = rope(lin(h, f"{p}.self_attn.k_proj").view(S, Hkv, D))
        v = lin(h, f"{p}.self_attn.v_proj").view(S, Hkv, D)
        out = torch.empty(S, H, D, dtype=torch.float64)
        for head in range(H):
            kv = head // (H // Hkv)
            scores = q[:, head] @ k[:, kv].T / math.sqrt(D)
            scores = scores.masked_fill(torch.triu(torch.ones(S, S, dtype=torch.bool), 1), -math.inf)
            out[:, head] = torch.softmax(scores, -1) @ v[:, kv]
        x = x + lin(out.reshape(S, H * D), f"{p}.self_attn.o_proj")
        h = norm(x, w[f"{p}.post_attention_layernorm.weight"])
        if relu2:
            y = torch.relu(lin(h, f"{p}.mlp.up_proj")) ** 2
            if two_by_four:
                y = keep_top2_of_4(y)
        else:
            gate = lin(h, f"{p}.mlp.gate_proj")
            y = gate * torch.sigmoid(gate) * lin(h, f"{p}.mlp.up_proj")
        x = x + lin(y, f"{p}.mlp.down_proj")
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return norm(x, w["model.norm.weight"]) @ head.T


def keep_top2_of_4(y: torch.Tensor) -> torch.Tensor:
    """Zero all but the 2 largest |y| of every 4 (stable: ties to the lower index); tail dense."""
    n = y.shape[-1] - y.shape[-1] % 4
    groups = y[..., :n].reshape(*y.shape[:-1], n // 4, 4)
    order = torch.argsort(-groups.abs(), dim=-1, stable=True)[..., :2]
    kept = torch.zeros_like(groups).scatter(-1, order, groups.gather(-1, order))
    return torch.cat((kept.reshape(*y.shape[:-1], n), y[..., n:]), dim=-1)
