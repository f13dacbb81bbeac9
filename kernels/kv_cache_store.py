"""KV-cache store in Triton: new keys/values written into the paged cache at their slots.

Owns `store_kvcache` (the launcher, registered as the custom op `elas_serve::store_kvcache` so
torch.compile keeps it in one graph) and its kernel; the PyTorch reference is
`paged_attention.store_kvcache_ref`.

Invariants: the cache of one layer is `(2, num_blocks, block_size, num_kv_heads, head_dim)` (keys
at index 0, values at 1) with `head_dim` contiguous; `slot_mapping[t]` is the flat slot
`block * block_size + offset` of token t. Padded rows point into the null block (block 0), never at
-1, so the kernel writes every row, needs nothing from the host and is safe to capture in a CUDA
graph. Two rows writing the same slot (only padded rows do) race; the null block is never read as
context by a real sequence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import KERNEL_DTYPES, interpreting


@triton.jit
def _store_kvcache_kernel(k_ptr, v_ptr, cache_ptr, slot_mapping_ptr,
                          stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_kv, stride_slot, stride_head,
                          HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """One program per (token, kv head): copy its key and value rows (D,) into the cache."""
    t = tl.program_id(0)
    head = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    key = tl.load(k_ptr + t.to(tl.int64) * stride_kt + head * stride_kh + offs_d, mask=d_ok)
    value = tl.load(v_ptr + t.to(tl.int64) * stride_vt + head * stride_vh + offs_d, mask=d_ok)
    dst = cache_ptr + slot * stride_slot + head * stride_head + offs_d
    tl.store(dst, key, mask=d_ok)
    tl.store(dst + stride_kv, value, mask=d_ok)


def _check(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache must be (2, num_blocks, block_size, num_kv_heads, head_dim), "
                         f"got {tuple(kv_cache.shape)}")
    if k.shape != v.shape or k.dim() != 3 or tuple(k.shape[1:]) != tuple(kv_cache.shape[3:]):
        raise ValueError(f"k and v must be (T, num_kv_heads, head_dim) = (T, {kv_cache.shape[3]}, "
                         f"{kv_cache.shape[4]}), got {tuple(k.shape)} and {tuple(v.shape)}")
    if slot_mapping.shape != k.shape[:1] or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be ({k.shape[0]},) int32/int64, "
                         f"got {tuple(slot_mapping.shape)} {slot_mapping.dtype}")
    if kv_cache.dtype not in KERNEL_DTYPES or k.dtype != kv_cache.dtype or v.dtype != kv_cache.dtype:
        raise ValueError(f"k, v and kv_cache need one dtype of {KERNEL_DTYPES}, "
                         f"got {k.dtype}, {v.dtype}, {kv_cache.dtype}")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("k, v and kv_cache need a contiguous last (head_dim) dimension")
    if kv_cache.stride(1) != kv_cache.shape[2] * kv_cache.stride(2):
        raise ValueError("kv_cache blocks must be contiguous in their slots (flat slot indexing)")
    devices = {t.device for t in (k, v, kv_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if kv_cache.device.type != "cuda" and not interpreting():
        raise RuntimeError("the Triton KV-cache store needs CUDA, or TRITON_INTERPRET=1 on the CPU")


@torch.library.custom_op("elas_serve::store_kvcache", mutates_args=("kv_cache",))
def store_kvcache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write k, v (T, Hkv, D) into `kv_cache` (2, num_blocks, block_size, Hkv, D) at `slot_mapping` (T,).

    Same result as `store_kvcache_ref`; every argument stays on the device (graph safe).
    """
    _check(k, v, kv_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens, num_kv_heads)](
        k, v, kv_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim))


@store_kvcache.register_fake
def _store_kvcache_fake(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    _check(k, v, kv_cache, slot_mapping)  # NOTE: shapes, dtypes and devices are all a fake tensor has
