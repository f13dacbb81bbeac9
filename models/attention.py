"""Self-attention of the ELAS/LLaMA decoder, the metadata that drives it, and the attention op.

The attention layer knows no requests: it sees a flattened batch of tokens with explicit positions.
What says which rows belong to which sequence, where their keys/values go in the paged cache
(`slot_mapping`) and where each sequence's earlier tokens are (`block_tables`) is the step's
`AttentionMetadata`, set around a forward by `forward_context` (as vLLM's forward context) and
read only inside the custom op `elas_serve::attention`. So the metadata never reaches compiled
code: torch.compile sees an opaque op taking (q, k, v, kv_cache), and a new batch composition or
sequence length never recompiles. Without a KV cache (training, tests) the layer runs plain causal
attention over the given rows.

Invariants: sequence i's query rows are the last `query_lens[i]` of its `seq_lens[i]` tokens; the
op stores the new keys/values before it attends. On CUDA the op runs the Triton kernels (store +
one paged-attention kernel for prefill and decode, device tensors only: CUDA-graph safe); on the
CPU the PyTorch reference (`kernels/paged_attention.py`), which is also the tests' oracle.
NOTE: the context is thread-local, so a background compile can warm up while another thread serves.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from elas_serve.kernels.paged_attention import AttentionPlan, paged_attention_ref, store_kvcache_ref

from .config import ElasConfig
from .layers import Projection, ProjSpec, apply_rotary


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step batch description, built by the engine's model runner (all device tensors).

    `query_lens_cpu` / `seq_lens_cpu` are host copies the CPU reference uses; None in CUDA graphs,
    where lengths live only in the (static) tensors.
    """

    slot_mapping: torch.Tensor     # (T,) int64 flat cache slot per new token (padding: null block)
    block_tables: torch.Tensor     # (B, max_blocks) int32
    query_start_loc: torch.Tensor  # (B + 1,) int32: 0 and the cumulative query lengths
    seq_lens: torch.Tensor         # (B,) int32 context length after this step
    query_lens_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None
    cpu_plan: AttentionPlan | None = None  # the CPU reference's per-step work, made by the first layer

    @classmethod
    def from_lens(cls, slot_mapping: torch.Tensor, block_tables: torch.Tensor, query_lens: list[int],
                  seq_lens: list[int]) -> "AttentionMetadata":
        if len(query_lens) != len(seq_lens) or len(query_lens) != block_tables.shape[0]:
            raise ValueError("query_lens, seq_lens and block_tables need one entry per sequence")
        if any(q < 1 or q > s for q, s in zip(query_lens, seq_lens)):
            raise ValueError("need 1 <= query_len <= seq_len for every sequence")
        if slot_mapping.shape[0] != sum(query_lens):
            raise ValueError("slot_mapping has one entry per query token")
        device = slot_mapping.device
        starts = torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return cls(slot_mapping, block_tables, starts.to(device),
                   torch.tensor(seq_lens, dtype=torch.int32, device=device), list(query_lens), list(seq_lens))

    def host_lens(self) -> tuple[list[int], list[int]]:
        if self.query_lens_cpu is not None and self.seq_lens_cpu is not None:
            return self.query_lens_cpu, self.seq_lens_cpu
        starts = self.query_start_loc.tolist()
        return [b - a for a, b in zip(starts, starts[1:])], self.seq_lens.tolist()


_context = threading.local()


@contextlib.contextmanager
def forward_context(attn_metadata: AttentionMetadata) -> Iterator[None]:
    """Make `attn_metadata` the one the attention op reads during this thread's forward."""
    previous = getattr(_context, "attn_metadata", None)
    _context.attn_metadata = attn_metadata
    try:
        yield
    finally:
        _context.attn_metadata = previous


def current_metadata() -> AttentionMetadata:
    meta = getattr(_context, "attn_metadata", None)
    if meta is None:
        raise RuntimeError("paged attention ran outside a forward_context (no AttentionMetadata set)")
    return meta


@torch.library.custom_op("elas_serve::attention", mutates_args=("kv_cache",))
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Store k, v (T, Hkv, D) at the context's slots, then attend q (T, H, D) -> (T, H, D)."""
    meta = current_metadata()
    if q.is_cuda:
        from elas_serve.kernels.kv_cache_store import store_kvcache
        from elas_serve.kernels.paged_attention_triton import paged_attention

        store_kvcache(k, v, kv_cache, meta.slot_mapping)
        return paged_attention(q, kv_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale)
    store_kvcache_ref(k, v, kv_cache, meta.slot_mapping)
    query_lens, seq_lens = meta.host_lens()
    if meta.cpu_plan is None:
        meta.cpu_plan = AttentionPlan.build(meta.block_tables, query_lens, seq_lens, kv_cache.shape[2])
    return paged_attention_ref(q, kv_cache, meta.block_tables, query_lens, seq_lens, scale, meta.cpu_plan)


@attention_op.register_fake
def _(q, k, v, kv_cache, scale):
    return torch.empty_like(q)


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
        self.qkv_weight: torch.Tensor | None = None  # set by `fuse_qkv`
        self.kv_weight_out: torch.Tensor | None = None

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """For serving: q, k and v share their input, so their (first) factors become one GEMM.

        Dense: one (Hq*D + 2*Hkv*D, hidden) weight. Low-rank: the first factors side by side,
        (hidden, rq + rk + rv), and the k and v second factors stacked (2, Hkv*D, r) for one batched
        GEMM when their ranks agree. NOTE: the projections' parameters become views into the fused
        tensors (no second copy of the weights); biases stay per projection.
        """
        projs = (self.q_proj, self.k_proj, self.v_proj)
        ranks = {p.spec.rank for p in projs}
        if self.qkv_weight is not None or len(ranks) != 1 and None in ranks:
            return  # fused already, or dense and low-rank mixed: left as three projections
        if None in ranks:
            fused = torch.cat([p.weight for p in projs])
            for p, w in zip(projs, fused.split([p.out_features for p in projs])):
                p.weight = nn.Parameter(w, requires_grad=False)
        else:
            fused = torch.cat([p.weight_in for p in projs], dim=1)
            for p, w in zip(projs, fused.split([p.spec.rank for p in projs], dim=1)):
                p.weight_in = nn.Parameter(w, requires_grad=False)
            if self.k_proj.spec.rank == self.v_proj.spec.rank:
                self.kv_weight_out = torch.stack([self.k_proj.weight_out, self.v_proj.weight_out])
                self.k_proj.weight_out = nn.Parameter(self.kv_weight_out[0], requires_grad=False)
                self.v_proj.weight_out = nn.Parameter(self.kv_weight_out[1], requires_grad=False)
        self.qkv_weight = fused

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if self.qkv_weight is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_proj.spec.rank is None:  # dense: (..., Hq*D + 2*Hkv*D)
            q, k, v = F.linear(x, self.qkv_weight).split([p.out_features for p in projs], dim=-1)
        else:
            aq, ak, av = (x @ self.qkv_weight).split([p.spec.rank for p in projs], dim=-1)  # (..., r) each
            q = F.linear(aq, self.q_proj.weight_out)
            if self.kv_weight_out is None:
                k, v = F.linear(ak, self.k_proj.weight_out), F.linear(av, self.v_proj.weight_out)
            else:  # (2, T, r) @ (2, r, Hkv*D) in one batched GEMM
                akv = torch.stack([ak.reshape(-1, ak.shape[-1]), av.reshape(-1, av.shape[-1])])
                k, v = torch.bmm(akv, self.kv_weight_out.transpose(1, 2)).unflatten(1, x.shape[:-1])
        biases = [p.bias for p in projs]
        if any(b is not None for b in biases):
            q, k, v = (t if b is None else t + b for t, b in zip((q, k, v), biases))
        return q, k, v

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                kv_cache: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._qkv(x)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))  # (..., H, D)
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))  # (..., Hkv, D)
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv_cache is None:
            o = self._causal(q, k, v)
        else:  # (T, H, D): one flattened batch, described by the forward context
            o = torch.ops.elas_serve.attention(q, k, v, kv_cache, self.scale)
        return self.o_proj(o.flatten(-2))

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # (..., S, H, D) -> (..., H, S, D): every leading row is one independent sequence
        o = F.scaled_dot_product_attention(
            q.transpose(-2, -3), k.transpose(-2, -3), v.transpose(-2, -3), is_causal=True,
            scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)
        return o.transpose(-2, -3)
