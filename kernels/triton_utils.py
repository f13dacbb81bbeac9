"""What every Triton launcher here shares: where a kernel may run, how its dots are computed, and
how many programs it takes to fill the device.

Invariants: a Triton kernel runs on CUDA tensors, or on CPU tensors under the interpreter
(`TRITON_INTERPRET=1`, read by `triton.jit` when a kernel is defined, so it must be set before this
package is imported); every `tl.dot` accumulates in float32 with IEEE float32 inputs (never TF32),
so the kernels compute what the float32 PyTorch references compute. Launchers also accept `meta`
tensors: `benchmarks/inspect_kernels.py` runs them that way, with a stand-in driver that compiles
what they would launch instead of launching it (`AOT_NUM_SMS` stands in for the device's SMs).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
AOT_NUM_SMS = 132  # H100 SXM / H200: what launchers on `meta` tensors size their grids for
# NOTE: above this many tokens the output tiles alone fill the GPU: no reduction is split.
SPLIT_MAX_TOKENS = 1024
MAX_SPLITS = 64


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_operands(*tensors: torch.Tensor) -> None:
    """Same device and dtype (one of KERNEL_DTYPES), a device Triton can run on, 2-D operands."""
    device, dtype = tensors[0].device, tensors[0].dtype
    assert dtype in KERNEL_DTYPES, f"unsupported dtype {dtype}"
    for t in tensors:
        assert t.dim() == 2, f"expected a 2-D operand, got shape {tuple(t.shape)}"
        assert t.device == device and t.dtype == dtype, (t.device, t.dtype, device, dtype)
    if device.type not in ("cuda", "meta") and not interpreting():
        raise RuntimeError("Triton kernels need a CUDA device, or TRITON_INTERPRET=1 on the CPU")


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether kernels must feed `tl.dot` float32 copies of their `dtype` operands.

    NOTE: the interpreter of triton 3.9 multiplies bfloat16 dot operands as their raw uint16 bits
    (`create_dot` in triton/runtime/interpreter.py), so under the interpreter bfloat16 operands are
    upcast first. The products of two bfloat16 values are exact in float32, so this computes what a
    tensor-core bf16 dot with float32 accumulation computes.
    """
    return interpreting() and dtype == torch.bfloat16


@functools.cache
def _cuda_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; 1 on the CPU (the interpreter gains nothing)."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return AOT_NUM_SMS if device.type == "meta" else 1


@functools.cache
def _cuda_arch(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def target_arch(device: torch.device) -> int:
    """The compute capability kernels are compiled for (90 = sm90): the device's on CUDA, the
    stand-in driver's target for `meta` tensors (ahead-of-time compiles), 90 under the interpreter."""
    if device.type == "cuda":
        return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "meta":
        from triton.runtime import driver
        return driver.active.get_current_target().arch
    return 90


def num_splits(device: torch.device, num_tiles: int, num_blocks: int, num_tokens: int) -> int:
    """How many programs share one output tile's reduction (`num_blocks` blocks of it).

    Only for few tokens (<= SPLIT_MAX_TOKENS) and only while the `num_tiles` output tiles leave SMs
    idle: enough splits for about one wave of programs, never a split of less than one block. Every
    split writes a float32 partial of its tile (summed by `split_reduce.sum_splits`), so a wave,
    not two, is the target: at 1024 tokens and 16 tiles that is 8 splits, not 17.
    """
    sms = num_sms(device)
    if num_tokens > SPLIT_MAX_TOKENS or 2 * num_tiles > sms:
        return 1
    return max(1, min(sms // num_tiles, num_blocks, MAX_SPLITS))


def warps_for(block_t: int) -> int:
    """Warps matched to a BLOCK_T-row tile of chained dots: one warp per 16 rows, 4 to 8 of them.

    NOTE: Triton gives dots that feed another dot `warpsPerCTA = [num_warps, 1]`: 8 warps on a
    64-row tile would cover 128 rows, both warpgroups computing the same ones (review defect 1).
    """
    return max(4, min(8, block_t // 16))


@triton.jit
def dot_acc(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation (see `upcast_dots`)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """float32 `x` rounded to nearest-even DTYPE.

    NOTE: the interpreter truncates float32 -> bfloat16 casts (round toward zero) where the GPU
    rounds to nearest even; rounding the bits by hand first makes the cast exact on both.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)
