"""Roofline arithmetic for one ELAS FFN layer, per way of computing it: bytes, FLOPs and the time a
device with given peaks could not beat. Arithmetic, never a measurement.

    python benchmarks/ffn_roofline.py            # the H100 and H200 tables of docs/kernels.md

Model: a variant is a sequence of kernels; each reads its inputs and writes its outputs once from
HBM and takes max(bytes / bandwidth, FLOPs / peak); the variant's time is the sum. FLOPs are dense
GEMM FLOPs (2 M N K); the cuSPARSELt GEMM runs at the sparse tensor-core peak. The eager PyTorch
chains are not modelled by hand: they are counted op by op (every aten op's input and output bytes,
mm FLOPs) by running them on meta tensors under a TorchDispatchMode. Shapes: x (M, hidden), LORO
factors of rank r, F = the relu ** 2 width; the sparse activation takes 9/16 of its dense bytes.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Device:
    name: str
    dense_flops: float  # bf16 tensor-core FLOP/s
    sparse_flops: float  # 2:4 sparse tensor-core FLOP/s
    bandwidth: float  # HBM bytes/s


# Public datasheet figures (research notes, sparsity.md section 7): H100 SXM 989.4 / 1978.9 TFLOP/s
# bf16, 3.35 TB/s; H200 SXM the same compute, 4.8 TB/s.
H100 = Device("H100 SXM", 989.4e12, 1978.9e12, 3.35e12)
H200 = Device("H200 SXM", 989.4e12, 1978.9e12, 4.8e12)
DEVICES = {"h100": H100, "h200": H200}


def device_for(name: str) -> Device:
    """The peaks of a device by (CUDA) name; H100's for anything else (labelled in results)."""
    return H200 if "H200" in name.upper() else H100


@dataclass(frozen=True)
class Kernel:
    name: str
    bytes: float
    flops: float
    sparse: bool = False

    def seconds(self, dev: Device) -> float:
        return max(self.bytes / dev.bandwidth, self.flops / (dev.sparse_flops if self.sparse else dev.dense_flops))


def _gemm(name: str, m: int, n: int, k: int, in_bytes: float | None = None, out_bytes: float | None = None,
          b: int = 2, sparse: bool = False, recompute: int = 1) -> Kernel:
    a = m * k * b if in_bytes is None else in_bytes
    c = m * n * b if out_bytes is None else out_bytes
    return Kernel(name, a + k * n * b + c, 2 * m * n * k * recompute, sparse)


def kernels(variant: str, m: int, hidden: int, width: int, rank: int, up_recompute: int = 1) -> list[Kernel]:
    """The modelled kernel sequence of `variant` (see VARIANTS) for M tokens."""
    h, f, r = hidden, width, rank
    y_sparse = m * f * 2 * 9 / 16
    first = _gemm("x @ up.weight_in", m, r, h)
    last = _gemm("z @ down.weight_out.T", m, h, r)
    if variant == "compiled":  # inductor: the mask and relu ** 2 fused into one elementwise pass
        return [first, _gemm("up GEMM", m, f, r), Kernel("relu2 + 2:4", 4 * m * f, 0),
                _gemm("down GEMM", m, r, f), last]
    if variant == "dense":  # relu ** 2 + 2:4 in the up GEMM's epilogue, cuBLAS down
        return [first, _gemm("up GEMM + epilogue", m, f, r), _gemm("down GEMM", m, r, f), last]
    if variant == "sparse24_cslt":
        return [first, _gemm("up GEMM -> cuSPARSELt layout", m, f, r, out_bytes=y_sparse),
                _gemm("cuSPARSELt 2:4 GEMM", m, r, f, in_bytes=y_sparse, sparse=True), last]
    if variant == "sparse24_triton":
        return [first, _gemm("up GEMM -> Sparse24", m, f, r, out_bytes=y_sparse),
                _gemm("Triton 2:4 GEMM (dense TC)", m, r, f, in_bytes=y_sparse), last]
    if variant == "sparse24_gemv":  # at one token 2:4 alone skips half of the rows
        kept = 1 - 0.5 ** m
        return [first, _gemm("up GEMM + epilogue", m, f, r),
                Kernel("row-skipping GEMV", m * f * 2 + kept * f * r * 2 + m * r * 2, 2 * m * f * r), last]
    if variant == "fused":
        core = Kernel("fused up + relu2 + 2:4 + down", (m * r + 2 * f * r + m * r) * 2,
                      2 * m * f * r * (up_recompute + 1))
        return [first, core, last]
    if variant == "ideal_sparse":  # one kernel, the down GEMM on sparse tensor cores
        return [first, Kernel("fused, up dense + down sparse", (m * r + 2 * f * r + m * r) * 2, 2 * m * f * r),
                Kernel("(sparse half of the fused kernel)", 0, 2 * m * f * r, sparse=True), last]
    raise ValueError(f"no model for {variant!r}")


def dispatch_kernels(fn, *args) -> list[Kernel]:
    """Every aten op `fn(*args)` runs on meta tensors, as a Kernel (bytes in + out, mm FLOPs)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    ops: list[Kernel] = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            returns = func._schema.returns
            if returns and returns[0].alias_info is not None:
                return out  # a view: no kernel, no traffic
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            flops = 0
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                a, b = [t for t in args if isinstance(t, torch.Tensor)][-2:]
                flops = 2 * math.prod(a.shape) * b.shape[-1]
            ops.append(Kernel(str(func.__name__), nbytes, flops))
            return out

    # NOTE: outside inference mode composite ops (matmul, square) decompose into what runs (mm, pow)
    with torch.inference_mode(False), torch.no_grad(), Count():
        fn(*args)
    return ops


def eager_kernels(masked: bool, m: int, hidden: int, width: int, rank: int) -> list[Kernel]:
    """The eager reference chain (with or without its 2:4 mask), counted op by op."""
    import torch
    sys.path.insert(0, str(ROOT))
    try:
        from elas_serve.kernels.ffn import ffn_reference
    except ImportError:
        from kernels.ffn import ffn_reference

    def t(*shape):
        return torch.empty(*shape, dtype=torch.bfloat16, device="meta")

    up, down = (t(hidden, rank), t(width, rank)), (t(width, rank), t(hidden, rank))
    return dispatch_kernels(ffn_reference, t(m, hidden), up, down, masked)


VARIANTS = ("eager_masked", "eager_unmasked", "compiled", "dense", "sparse24_cslt", "sparse24_triton",
            "sparse24_gemv", "fused", "ideal_sparse")


def variant_kernels(variant: str, m: int, hidden: int, width: int, rank: int, up_recompute: int = 1) -> list[Kernel]:
    if variant.startswith("eager_"):
        return eager_kernels(variant == "eager_masked", m, hidden, width, rank)
    return kernels(variant, m, hidden, width, rank, up_recompute)


def roofline(variant: str, m: int, hidden: int, width: int, rank: int, dev: Device,
             up_recompute: int = 1) -> dict:
    """{"bytes", "flops", "roofline_us", "kernels"} of one variant at M tokens on `dev`."""
    ks = variant_kernels(variant, m, hidden, width, rank, up_recompute)
    return {"bytes": sum(k.bytes for k in ks), "flops": sum(k.flops for k in ks),
            "roofline_us": 1e6 * sum(k.seconds(dev) for k in ks), "kernels": len(ks)}


def weight_floor_us(hidden: int, width: int, rank: int, dev: Device) -> float:
    """Streaming the FFN's four LORO factors once: decode's floor."""
    return 1e6 * 2 * 2 * rank * (hidden + width) / dev.bandwidth


def table(shapes: dict, ms: tuple[int, ...], dev: Device) -> str:
    """A markdown roofline table per shape (microseconds), every variant."""
    lines = []
    for name, (hidden, width, rank) in shapes.items():
        lines += [f"**{name}** (hidden {hidden}, F {width}, r {rank}) on {dev.name} "
                  f"({dev.dense_flops / 1e12:.0f} / {dev.sparse_flops / 1e12:.0f} TFLOP/s, "
                  f"{dev.bandwidth / 1e12:.2f} TB/s); weight floor {weight_floor_us(hidden, width, rank, dev):.2f} us",
                  "", "| variant | " + " | ".join(f"M={m}" for m in ms) + " |", "|---|" + "---:|" * len(ms)]
        for v in VARIANTS:
            if v == "sparse24_gemv":
                cells = [f"{roofline(v, m, hidden, width, rank, dev)['roofline_us']:.1f}" if m <= 16 else "-"
                         for m in ms]
            else:
                rec = 2 if v == "fused" and rank > 256 else 1  # 256-wide N tiles: r = 512 takes two
                cells = [f"{roofline(v, m, hidden, width, rank, dev, rec)['roofline_us']:.1f}" for m in ms]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from bench_ffn import PRESET_SHAPES  # noqa: E402 - the same shapes as the benchmark
    ms = (1, 8, 32, 128, 512, 2048, 8192, 16384)
    for dev in (H100, H200):
        print(table(PRESET_SHAPES, ms, dev))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
