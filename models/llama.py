"""The ELAS / LLaMA decoder: `ElasForCausalLM`.

Module and parameter names equal the checkpoint's tensor names (`model.layers.3.mlp.up_proj.
weight_in`, ...), so loading is by name. The model knows no requests: `forward` takes token ids,
their positions and, for serving, the paged-attention metadata and per-layer KV caches.
Which projections are low-rank is data (`proj_specs`, read from a checkpoint's shapes or chosen by
the trainer), keyed by module path as given by `projection_names`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from elas_serve.kernels.ffn import FFN_BACKENDS

from .attention import Attention, AttentionMetadata, forward_context
from .config import ElasConfig
from .layers import ProjSpec, RMSNorm, RotaryEmbedding
from .mlp import ElasMLP, SwiGLUMLP

ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")


def mlp_projs(config: ElasConfig) -> tuple[str, ...]:
    return ("up_proj", "down_proj") if config.ffn_kind == "relu2" else (
        "gate_proj", "up_proj", "down_proj")


def projection_names(config: ElasConfig) -> list[str]:
    """Module paths of every projection, e.g. `model.layers.0.self_attn.q_proj`."""
    names = []
    for i in range(config.num_hidden_layers):
        names += [f"model.layers.{i}.self_attn.{p}" for p in ATTN_PROJS]
        names += [f"model.layers.{i}.mlp.{p}" for p in mlp_projs(config)]
    return names


class DecoderLayer(nn.Module):
    def __init__(self, config: ElasConfig, prefix: str, specs: Mapping[str, ProjSpec]):
        super().__init__()
        attn = {p: specs.get(f"{prefix}.self_attn.{p}", ProjSpec()) for p in ATTN_PROJS}
        mlp = {p: specs.get(f"{prefix}.mlp.{p}", ProjSpec()) for p in mlp_projs(config)}
        self.self_attn = Attention(config, attn)
        self.mlp = ElasMLP(config, mlp) if config.ffn_kind == "relu2" else SwiGLUMLP(config, mlp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                kv_cache: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(rope, self.input_layernorm(x), kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class ElasModel(nn.Module):
    def __init__(self, config: ElasConfig, specs: Mapping[str, ProjSpec]):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, f"model.layers.{i}", specs)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The decoder stack: what the engine compiles. With `kv_caches`, the caller has set a
        `forward_context` describing the flattened batch."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary_emb(positions)  # cos, sin: (..., 1, D) float32
        for i, layer in enumerate(self.layers):
            x = layer(rope, x, None if kv_caches is None else kv_caches[i])
        return self.norm(x)


class ElasForCausalLM(nn.Module):
    def __init__(self, config: ElasConfig, proj_specs: Mapping[str, ProjSpec] | None = None):
        super().__init__()
        specs = dict(proj_specs or {})
        unknown = set(specs) - set(projection_names(config))
        if unknown:
            raise ValueError(f"proj_specs names unknown projections: {sorted(unknown)[:3]}")
        self.config = config
        self.model = ElasModel(config, specs)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata | None = None,
                kv_caches: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Final hidden states (..., hidden) of `input_ids` (...) at `positions` (...).

        With `attn_metadata`, the ids are one flattened batch (T,) and `kv_caches[i]` is layer
        i's paged cache; without, each leading row is one whole sequence, attended causally.
        """
        if attn_metadata is None:
            return self.model(input_ids, positions)
        with forward_context(attn_metadata):
            return self.model(input_ids, positions, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits (..., vocab) of final hidden states."""
        return F.linear(hidden, self.output_weight).float()

    @torch.no_grad()
    def prepare_for_serving(self) -> None:
        """Serving-only layouts (the same function; parameters may become views): q/k/v fused
        (`Attention.fuse_qkv`) and, on the CPU, the output weight stored column-major.

        NOTE: the output projection is the largest weight (62.5 MB in float32 at the 60m shape) and a
        decode step reads it whole, and a CPU GEMV of `h @ W.T` with a row-major W runs well below
        the bandwidth of one whose W.T is contiguous.
        """
        for layer in self.model.layers:
            layer.self_attn.fuse_qkv()
        weight = self.output_weight
        if weight.device.type == "cpu" and weight.is_contiguous():
            weight.data = weight.data.t().contiguous().t()  # (vocab, hidden) with stride (1, vocab)

    def set_ffn_backend(self, backend: str | list[tuple[int, str]]) -> None:
        """Route every ELAS FFN through a backend of `kernels.ffn.FFN_BACKENDS`, or through a table
        `[(max_tokens, name), ...]` choosing one by the number of tokens of each call."""
        table = [(float("inf"), backend)] if isinstance(backend, str) else list(backend)
        for _, name in table:
            if name not in FFN_BACKENDS:
                raise ValueError(f"unknown FFN backend {name!r} (available: {', '.join(FFN_BACKENDS)})")
        for layer in self.model.layers:
            if isinstance(layer.mlp, ElasMLP):
                layer.mlp.ffn_table = tuple(table)

    def projection_specs(self) -> dict[str, ProjSpec]:
        return {name: self.get_submodule(name).spec for name in projection_names(self.config)}
