"""The cuSPARSELt path of the `sparse24` backend: 2:4 activation (T, F) @ w (F, N) on sparse tensor
cores through `torch._cslt_compress` + `torch._cslt_sparse_mm` (sm80 / sm90, fp16 / bf16).

The activation is the sparse left operand (M = tokens, K = features). Our Triton kernel writes the
2:4-pruned squared-ReLU body as a dense (M_pad, K_pad) buffer, zero-padded to M % 32 == 0 and
K % 64 == 0 (zero groups are valid 2:4); `torch._cslt_compress` turns it into cuSPARSELt's own
(undocumented, architecture-specific) values + metadata layout, and the dense tail (F % 4 features)
is added by one small matmul. The weight is padded once to (K_pad, N_pad), N % 8 == 0, and cached
while the weight tensor lives and is unmodified.

NOTE: UNVERIFIED ON GPU at the time of writing (no GPU was available). `cslt_usable` therefore
probes the path once per device and dtype against the reference and disables it, with a warning,
on any error or mismatch (PyTorch issue #155333: wrong results with some cuSPARSELt algorithms);
the `sparse24` backend then falls back to the Triton GEMM. float32 never takes this path (cuSPARSELt
would compute it in TF32, not what the float32 reference computes).
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F

from .relu2_sparse24 import relu2_sparse24_pruned, relu2_sparse24_ref

PAD_M, PAD_K, PAD_N = 32, 64, 8
_WEIGHTS: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}
_USABLE: dict[tuple[torch.device, torch.dtype], bool] = {}


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def cslt_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build, device and dtype could run cuSPARSELt at all."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if not (hasattr(torch, "_cslt_compress") and hasattr(torch, "_cslt_sparse_mm")):
        return False
    backend = getattr(torch.backends, "cusparselt", None)
    if backend is None or not backend.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major in (8, 9)


def _padded_weight(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """`w` (F, N) zero-padded to a contiguous (rows, cols), cached per live, unmodified tensor."""
    base = w if w._base is None else w._base
    key = (id(base), base._version, w.data_ptr(), tuple(w.shape), w.stride(), rows, cols)
    hit = _WEIGHTS.get(key)
    if hit is not None and hit[0]() is base:
        return hit[1]
    padded = F.pad(w, (0, cols - w.shape[1], 0, rows - w.shape[0])).contiguous()
    if len(_WEIGHTS) > 256:
        _WEIGHTS.clear()
    _WEIGHTS[key] = (weakref.ref(base), padded)
    return padded


def sparse24_matmul_cslt(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sparse24(relu(h) ** 2) @ w via cuSPARSELt: pre-activation h (T, F), w (F, N) -> (T, N)."""
    (num_tokens, width), n = h.shape, w.shape[1]
    body = width - width % 4
    rows, cols = _round_up(max(num_tokens, 1), PAD_M), _round_up(max(body, 1), PAD_K)
    pruned, tail = relu2_sparse24_pruned(h, rows, cols)  # (rows, cols), (T, F % 4)
    w_pad = _padded_weight(w[:body], cols, _round_up(n, PAD_N))  # (cols, N_pad)
    out = torch._cslt_sparse_mm(torch._cslt_compress(pruned), w_pad)[:num_tokens, :n]
    if width > body:
        out = torch.addmm(out, tail, w[body:])
    return out


def cslt_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """`cslt_supported`, and a probe of this path agrees with the reference (checked once)."""
    key = (device, dtype)
    if key not in _USABLE:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False  # NOTE: no probe inside a CUDA-graph capture; the next eager call probes
        _USABLE[key] = cslt_supported(device, dtype) and _probe(device, dtype)
    return _USABLE[key]


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        g = torch.Generator(device=device).manual_seed(0)
        h = torch.randn(40, 203, generator=g, device=device).to(dtype)
        w = (torch.randn(203, 72, generator=g, device=device) / 8).to(dtype)
        got = sparse24_matmul_cslt(h, w).float()
        ref = relu2_sparse24_ref(h).float() @ w.float()
        ok = bool(((got - ref).norm() / ref.norm()) < 1e-2)
    except Exception as e:  # noqa: BLE001 - any failure means "do not use"
        warnings.warn(f"cuSPARSELt path disabled on {device}: {e!r}")
        return False
    if not ok:
        warnings.warn(f"cuSPARSELt path disabled on {device}: probe disagrees with the reference")
    return ok
