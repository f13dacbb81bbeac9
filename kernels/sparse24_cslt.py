"""The cuSPARSELt path of the `sparse24` backend: the 2:4 activation (T, F) @ w (F, N) on sparse
tensor cores through `torch._cslt_sparse_mm` (sm80 / sm90, bf16), fed in its own layout.

Flow: the up GEMM's epilogue writes cuSPARSELt's compressed values + metadata directly
(`gemm_relu2_sparse24.up_relu2_sparse24_cslt`, layout in `cslt_layout.py`), zero-padded to the
layout's tiles (M to 64 on sm90 / 128 on sm80, K likewise); `_cslt_sparse_mm` multiplies it with
the padded weight; the dense tail (F % 4 features) is one small addmm.

Plans (`CsltPlan`, one per device, dtype, token bucket (a power of two >= 64), K_pad and N_pad):
the weight's layout (column-major B, as NVIDIA's samples use, or row-major), `alg_id` and `split_k`
are searched once, by timing every candidate, and each candidate is first checked against a dense
float32 product, repeatedly (PyTorch issue 155333: some algorithms give wrong, shape-dependent,
non-deterministic results). A bucket where nothing passes gets no plan (the backend then uses the
Triton GEMM there, and says so once).

CUDA graphs: nothing is searched, probed or padded during a capture. `prepare` (called by the
`auto` tuner before any capture) makes every plan and padded weight up front; a capture that meets
a bucket without a plan records "no plan" for it (a warning, and the same choice for every later
call: eager and graph never differ), and padded weights are refreshed in place when the weight is
modified, so a graph never reads freed or stale memory.

Before the producer is trusted on a device and dtype, its buffer is compared with
`torch._cslt_compress` of the same pruned activation through `_cslt_sparse_mm` (`layout_ok`); if
it disagrees, the path compresses with `_cslt_compress` instead (slower, still correct).

NOTE: UNVERIFIED ON GPU (no GPU was available when this was written); the `gpu` tests cover it.
float32 never takes this path (cuSPARSELt would compute it in TF32).
"""

from __future__ import annotations

import logging
import statistics
import weakref
from typing import NamedTuple

import torch
import triton

from .cslt_layout import padded_shape
from .gemm_relu2_sparse24 import up_relu2_sparse24_cslt
from .relu2_sparse24 import relu2_sparse24_pruned, relu2_sparse24_ref

log = logging.getLogger("elas_serve.kernels")
MIN_BUCKET = 64
SPLIT_K = (1, 2, 4)
VALIDATE_REPEATS = 3
TOLERANCE = 2e-2  # relative Frobenius error of a bf16 GEMM with K in the thousands: ~4e-3


class CsltPlan(NamedTuple):
    col_major: bool  # B passed as a column-major (transposed contiguous) view
    alg_id: int
    split_k: int
    seconds: float  # the median time the search measured (at the bucket's size)


_PLANS: dict[tuple, CsltPlan | None] = {}
_LAYOUT_OK: dict[tuple, bool] = {}
_WEIGHTS: dict[int, dict[tuple, tuple[int, torch.Tensor]]] = {}  # id(weight base) -> padded copies


def cslt_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build, device and dtype can run cuSPARSELt at all (sm80/sm90, bf16)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return False
    if not (hasattr(torch, "_cslt_compress") and hasattr(torch, "_cslt_sparse_mm")):
        return False
    backend = getattr(torch.backends, "cusparselt", None)
    if backend is None or not backend.is_available():
        return False
    return device_arch(device) in (80, 90)


def device_arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor if major != 8 else 80  # NOTE: sm86/sm89 share sm80's layout class


def bucket(num_tokens: int) -> int:
    return max(MIN_BUCKET, triton.next_power_of_2(num_tokens))


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _mm_kwargs(split_k: int) -> dict:
    """`_cslt_sparse_mm` keyword arguments for split_k on this torch (2.11+: split_k_mode)."""
    names = {a.name for a in torch.ops.aten._cslt_sparse_mm.default._schema.arguments}
    if split_k == 1 or "split_k" not in names:
        return {}
    if "split_k_mode" in names:
        return {"split_k": split_k, "split_k_mode": 1}  # CUSPARSELT_SPLIT_K_MODE_ONE_KERNEL
    return {"split_k": split_k, "split_k_one_kernel": True}


def padded_weight(w: torch.Tensor, rows: int, cols: int, col_major: bool) -> torch.Tensor:
    """`w` (F, N) zero-padded to (rows, cols), as a row-major tensor or a column-major view.

    Cached per live weight tensor; a later in-place change of the weight is copied into the same
    buffer (graphs keep reading valid memory). Never allocates during a CUDA-graph capture.
    """
    base = w if w._base is None else w._base
    copies = _WEIGHTS.get(id(base))
    if copies is None:
        copies = _WEIGHTS[id(base)] = {}
        weakref.finalize(base, _WEIGHTS.pop, id(base), None)
    key = (w.data_ptr(), tuple(w.shape), w.stride(), rows, cols, col_major)
    hit = copies.get(key)
    if hit is not None and hit[0] == base._version:
        return hit[1]
    if _capturing(w.device):
        raise RuntimeError("cuSPARSELt weight not padded before CUDA-graph capture (call sparse24_cslt.prepare)")
    padded = torch.zeros(cols, rows, dtype=w.dtype, device=w.device).t() if col_major else \
        torch.zeros(rows, cols, dtype=w.dtype, device=w.device)
    if hit is not None:
        padded = hit[1]  # NOTE: refresh in place: a captured graph may read this buffer
    padded[:w.shape[0], :w.shape[1]].copy_(w)
    copies[key] = (base._version, padded)
    return padded


def _run(buf: torch.Tensor, w_pad: torch.Tensor, plan: CsltPlan) -> torch.Tensor:
    return torch._cslt_sparse_mm(buf, w_pad, alg_id=plan.alg_id, **_mm_kwargs(plan.split_k))


def _random_pruned(rows: int, cols: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(rows, cols, generator=g, device=device).to(dtype)
    return relu2_sparse24_ref(h)  # relu's zeros included, as in serving


def _candidates(buf: torch.Tensor, b_row: torch.Tensor) -> list[tuple[int, int]]:
    max_alg = 0
    search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
    if search is not None:
        try:
            max_alg = int(search(buf, b_row, None, None, None, False)[3])
        except RuntimeError as e:
            log.warning("cuSPARSELt mm_search failed (%s); searching alg_id 0 only", e)
    return [(alg, sk) for alg in range(max_alg + 1) for sk in SPLIT_K]


def _search(device: torch.device, dtype: torch.dtype, rows: int, k_pad: int, n_pad: int) -> CsltPlan | None:
    """The fastest candidate that agrees with a float32 dense product, at (rows, k_pad, n_pad)."""
    g = torch.Generator(device=device).manual_seed(1)
    w = (torch.randn(k_pad, n_pad, generator=g, device=device) / k_pad ** 0.5).to(dtype)
    layouts = {False: w.contiguous(), True: w.t().contiguous().t()}
    checks = []
    for seed in range(VALIDATE_REPEATS):  # NOTE: fresh data each time; failures are intermittent
        a = _random_pruned(rows, k_pad, dtype, device, seed)
        checks.append((torch._cslt_compress(a), a.float() @ w.float()))
    best = None
    for alg_id, split_k in _candidates(checks[0][0], layouts[False]):
        for col_major, b in layouts.items():
            plan = CsltPlan(col_major, alg_id, split_k, 0.0)
            try:
                ok = all(((_run(buf, b, plan).float() - ref).norm() / ref.norm()).item() < TOLERANCE
                         for buf, ref in checks for _ in range(2))
            except RuntimeError:
                continue  # an algorithm this shape does not support
            if not ok:
                log.warning("cuSPARSELt alg_id=%d split_k=%d %s-major B at %dx%dx%d gives wrong results; not used",
                            alg_id, split_k, "column" if col_major else "row", rows, k_pad, n_pad)
                continue
            seconds = _time(lambda: _run(checks[0][0], b, plan))
            if best is None or seconds < best.seconds:
                best = plan._replace(seconds=seconds)
    return best


def _time(fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def plan_for(device: torch.device, dtype: torch.dtype, num_tokens: int, k_pad: int, n_pad: int) -> CsltPlan | None:
    """The bucket's plan: searched on first use outside a capture; None where nothing passed."""
    key = (_index(device), dtype, bucket(num_tokens), k_pad, n_pad)
    if key not in _PLANS:
        if _capturing(device):
            log.warning("cuSPARSELt: no plan for %d tokens (bucket %s) before CUDA-graph capture; "
                        "this bucket uses the Triton 2:4 GEMM from now on (sparse24_cslt.prepare makes plans)",
                        num_tokens, key[2:])
            _PLANS[key] = None
        else:
            rows = padded_shape(key[2], k_pad, device_arch(device))[0]
            _PLANS[key] = _search(device, dtype, rows, k_pad, n_pad)
    return _PLANS[key]


def layout_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the producer's buffer multiplies like `_cslt_compress`'s (checked once, eagerly)."""
    key = (_index(device), dtype)
    if key not in _LAYOUT_OK:
        if _capturing(device):
            return False  # NOTE: the compress fallback is correct; the check runs on the next eager call
        g = torch.Generator(device=device).manual_seed(2)
        a = torch.randn(200, 96, generator=g, device=device).to(dtype)
        w_up = (torch.randn(520, 96, generator=g, device=device) / 10).to(dtype)
        w = (torch.randn(520, 72, generator=g, device=device) / 20).to(dtype)
        h = torch.empty(200, 520, dtype=dtype, device=device)
        buf, _ = up_relu2_sparse24_cslt(a, w_up, device_arch(device), h_out=h)
        rows, cols = padded_shape(200, 520, device_arch(device))
        pruned, _ = relu2_sparse24_pruned(h, rows, cols)
        w_pad = torch.zeros(cols, 72, dtype=dtype, device=device)
        w_pad[:520] = w
        ours, theirs = torch._cslt_sparse_mm(buf, w_pad), torch._cslt_sparse_mm(torch._cslt_compress(pruned), w_pad)
        _LAYOUT_OK[key] = bool(torch.equal(ours, theirs))
        if not _LAYOUT_OK[key]:
            log.warning("cuSPARSELt: the producer's layout disagrees with _cslt_compress on %s; "
                        "compressing with _cslt_compress instead", device)
    return _LAYOUT_OK[key]


def prepare(w: torch.Tensor, width: int, max_tokens: int) -> dict[int, CsltPlan | None]:
    """Every plan and padded weight for w (F, N) up to `max_tokens`, eagerly (before captures)."""
    if not cslt_supported(w.device, w.dtype):
        return {}
    arch, body = device_arch(w.device), width - width % 4
    k_pad, n_pad = padded_shape(1, body, arch)[1], triton.cdiv(w.shape[1], 8) * 8
    layout_ok(w.device, w.dtype)
    plans = {}
    b = MIN_BUCKET
    while True:
        plan = plans[b] = plan_for(w.device, w.dtype, b, k_pad, n_pad)
        if plan is not None:
            padded_weight(w[:body], k_pad, n_pad, plan.col_major)
        if b >= max_tokens:
            return plans
        b *= 2


def sparse24_matmul_cslt(a: torch.Tensor, w_up: torch.Tensor, w: torch.Tensor,
                         plan: CsltPlan | None = None) -> torch.Tensor:
    """sparse24(relu(a @ w_up.T) ** 2) @ w on cuSPARSELt: a (T, K), w_up (F, K), w (F, N) -> (T, N).

    `plan`: None takes the bucket's (searching it on first use); raises if the bucket has none.
    """
    (num_tokens, _), (width, n) = a.shape, w.shape
    arch, body = device_arch(a.device), width - width % 4
    rows, cols = padded_shape(num_tokens, body, arch)
    n_pad = triton.cdiv(n, 8) * 8
    plan = plan or plan_for(a.device, a.dtype, num_tokens, cols, n_pad)
    if plan is None:
        raise RuntimeError(f"no working cuSPARSELt plan for {num_tokens} tokens at K={cols}, N={n_pad}")
    if layout_ok(a.device, a.dtype):
        buf, tail = up_relu2_sparse24_cslt(a, w_up, arch)
    else:
        pruned, tail = relu2_sparse24_pruned(a @ w_up.T, rows, cols)
        buf = torch._cslt_compress(pruned)
    out = _run(buf, padded_weight(w[:body], cols, n_pad, plan.col_major), plan)[:num_tokens, :n]
    if width > body:
        out = torch.addmm(out, tail, w[body:])
    return out
