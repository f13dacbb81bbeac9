"""Self-attention of the ELAS/LLaMA decoder and the metadata that drives it.

The attention layer knows no requests: it sees a flattened batch of tokens with explicit positions
and an `AttentionMetadata` saying which rows belong to which sequence, where their keys/values go
in the paged cache (`slot_mapping`) and where each sequence's earlier tokens are (`block_tables`).
With no metadata it runs plain causal attention over the given rows (training and tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from elas_serve.kernels.paged_attention import decode_attention_ref, paged_attention_ref, store_kvcache_ref

from .config import ElasConfig
from .layers import Projection, ProjSpec, apply_rotary


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step batch description, built by the engine's model runner.

    Invariant: sequence i's query rows are the last `query_lens[i]` of its `seq_lens[i]` tokens.
    """

    slot_mapping: torch.Tensor  # (T,) int64 flat cache slot per new token (padding: null block)
    block_tables: torch.Tensor  # (B, max_blocks) int32
    query_lens: list[int]       # (B,) host ints; sum == T
    seq_lens: list[int]         # (B,) host ints; context length after this step
    # NOTE: set only for decode-only batches replayed in a CUDA graph: then attention reads
    # lengths from this tensor over the full block-table width, and the host lists are unused.
    seq_lens_tensor: torch.Tensor | None = None  # (B,) int

    def __post_init__(self) -> None:
        if len(self.query_lens) != len(self.seq_lens):
            raise ValueError("query_lens and seq_lens differ in length")
        if any(q < 1 or q > s for q, s in zip(self.query_lens, self.seq_lens)):
            raise ValueError("need 1 <= query_len <= seq_len for every sequence")
        if self.slot_mapping.shape[0] != sum(self.query_lens):
            raise ValueError("slot_mapping has one entry per query token")


class Attention(nn.Module):
    def __init__(self, config: ElasConfig, specs: dict[str, ProjSpec]):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.q_proj = Projection(h, self.num_heads * self.head_dim, specs["q_proj"])
        self.k_proj = Projection(h, self.num_kv_heads * self.head_dim, specs["k_proj"])
        self.v_proj = Projection(h, self.num_kv_heads * self.head_dim, specs["v_proj"])
        self.o_proj = Projection(self.num_heads * self.head_dim, h, specs["o_proj"])

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                attn_metadata: AttentionMetadata | None = None,
                kv_cache: torch.Tensor | None = None) -> torch.Tensor:
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))  # (..., H, D)
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))  # (..., Hkv, D)
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if attn_metadata is None:
            o = self._causal(q, k, v)
        else:
            assert kv_cache is not None, "attention metadata needs a KV cache"
            store_kvcache_ref(k, v, kv_cache, attn_metadata.slot_mapping)
            if attn_metadata.seq_lens_tensor is not None:
                o = decode_attention_ref(q, kv_cache, attn_metadata.block_tables,
                                         attn_metadata.seq_lens_tensor, self.scale)
            else:
                o = paged_attention_ref(q, kv_cache, attn_metadata.block_tables,
                                        attn_metadata.query_lens, attn_metadata.seq_lens, self.scale)
        return self.o_proj(o.flatten(-2))

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # (..., S, H, D) -> (..., H, S, D): every leading row is one independent sequence
        o = F.scaled_dot_product_attention(
            q.transpose(-2, -3), k.transpose(-2, -3), v.transpose(-2, -3), is_causal=True,
            scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)
        return o.transpose(-2, -3)
