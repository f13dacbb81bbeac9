"""Model presets, the model a `TrainConfig` describes, and its initialisation.

Presets are the ELAS/CoLA shapes (research notes, sparsity.md section 1.1: `cola_configs/*.json`
and the ELAS dev runs), plus `tiny` for CPU runs. `intermediate_size` is the SwiGLU width as the
authors write it; the ELAS FFN is `int(1.5 * intermediate_size)` wide (same parameter count).

Initialisation (what we chose, and why):
- low-rank factors: LORO's `init="auto"` (`loro_torch/lowrank_module.py`): both `weight_in` and
  `weight_out` ~ N(0, (init_std**2 / r) ** 0.25), so the product `weight_in @ weight_out.T` has
  entries of std `init_std`, the same as a dense HF-LLaMA projection;
- dense projections, embeddings and `lm_head`: N(0, init_std) (HF `LlamaPreTrainedModel`,
  `initializer_range` = 0.02); RMSNorm weights 1; biases 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from elas_serve.models import ElasConfig, ElasForCausalLM, ProjSpec, projection_names

if TYPE_CHECKING:
    from .config import TrainConfig


@dataclass(frozen=True, slots=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int  # SwiGLU width (ELAS FFN: int(1.5 * this))
    num_heads: int
    num_layers: int
    rank: int  # LORO rank of attention and MLP projections (r / hidden = 1/4, 1/3 for 130m)
    max_position_embeddings: int


PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(256, 688, 4, 4, 64, 1024),
    "60m": ModelShape(512, 1376, 8, 8, 128, 2048),
    "130m": ModelShape(768, 2048, 12, 12, 256, 2048),
    "350m": ModelShape(1024, 2736, 16, 24, 256, 2048),
    "1b": ModelShape(2048, 5461, 32, 24, 512, 2048),
}


def build_model_config(cfg: "TrainConfig", vocab_size: int, eos_token_id: int | None
                       ) -> tuple[ElasConfig, dict[str, ProjSpec]]:
    """The `ElasConfig` and per-projection storage (dense / LORO rank) of the run."""
    shape = PRESETS[cfg.preset]
    hidden = cfg.hidden_size or shape.hidden_size
    config = ElasConfig(
        hidden_size=hidden,
        intermediate_size=cfg.intermediate_size or shape.intermediate_size,
        num_attention_heads=cfg.num_heads or shape.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        num_hidden_layers=cfg.num_layers or shape.num_layers,
        vocab_size=vocab_size,
        max_position_embeddings=cfg.max_position_embeddings or shape.max_position_embeddings,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id,
        tie_word_embeddings=cfg.tie_word_embeddings,
        squ_relu="relu2" if cfg.ffn == "relu2" else "silu",
        activation_2by4=cfg.two_by_four, activation_sparse_method="naive")
    if cfg.seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds max_position_embeddings="
                         f"{config.max_position_embeddings}")
    # NOTE: a preset's rank follows its own hidden size; explicit sizes keep r = hidden / 4.
    default_rank = shape.rank if not cfg.hidden_size else max(hidden // 4, 1)
    ranks = {"self_attn": cfg.attn_rank or default_rank, "mlp": cfg.mlp_rank or default_rank}
    low_rank = {"all": ("self_attn", "mlp"), "attn": ("self_attn",), "mlp": ("mlp",),
                "none": ()}[cfg.lowrank_scope]
    with torch.device("meta"):
        dense = ElasForCausalLM(config, {})  # only read for each projection's in/out sizes
    specs = {}
    for name in projection_names(config):
        kind = name.split(".")[3]  # model.layers.{i}.{self_attn|mlp}.{proj}
        if kind not in low_rank:
            specs[name] = ProjSpec()
            continue
        rank, proj = ranks[kind], dense.get_submodule(name)
        d_in, d_out = proj.in_features, proj.out_features
        if rank >= min(d_in, d_out):
            raise ValueError(f"{'attn' if kind == 'self_attn' else 'mlp'} rank {rank} is not below "
                             f"min(in, out) = {min(d_in, d_out)} of {name}: a low-rank "
                             f"projection would be larger than a dense one (lower the rank, or "
                             f"use --lowrank-scope none for full rank)")
        specs[name] = ProjSpec(rank=rank)
    return config, specs


@torch.no_grad()
def init_weights(model: ElasForCausalLM, init_std: float, seed: int) -> None:
    """Initialise every parameter in place (see the module docstring), reproducibly from `seed`."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        elif name.endswith((".weight_in", ".weight_out")):
            rank = p.shape[1]
            value = torch.randn(p.shape, generator=g) * (init_std ** 2 / rank) ** 0.25
            p.copy_(value)
        else:  # embeddings, lm_head, dense projections
            p.copy_(torch.randn(p.shape, generator=g) * init_std)


def build_model(cfg: "TrainConfig", vocab_size: int, eos_token_id: int | None,
                device: torch.device) -> ElasForCausalLM:
    """A freshly initialised float32 model for `cfg` on `device`."""
    config, specs = build_model_config(cfg, vocab_size, eos_token_id)
    model = ElasForCausalLM(config, specs)
    init_weights(model, cfg.init_std, cfg.seed)
    return model.to(device)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
