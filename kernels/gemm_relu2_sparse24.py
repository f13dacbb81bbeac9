"""The up projection's GEMM with squared ReLU and 2:4 in its epilogue: `a @ w_up.T` -> relu ** 2 ->
top-2-of-4, written as the layout its consumer reads, so the pre-activation (T, F) never goes to
memory:

  pruned    y (T, F), dense with the dropped entries zero: the `dense` backend's chain on CUDA
            (then one cuBLAS GEMM), and the input of the decode GEMV (`sparse24_gemv.py`);
  sparse24  `Sparse24` (values, int16 nibble words, dense tail): the Triton 2:4 GEMM's input;
  cslt      cuSPARSELt's compressed buffer (M_pad, 9 K_pad / 16) for sm90 or sm80
            (`cslt_layout.py`), zero-padded, plus the dense tail (T, F % 4).

Operands: a (T, K) is the input of the up projection's last factor, w_up (F, K) that factor (see
`ffn_fused.py`). Each program computes a (BLOCK_T, BLOCK_F) tile with float32 accumulation over K in
BLOCK_K steps (software-pipelined), its columns permuted so that every group of 4 features lies in
one thread's accumulator registers (`relu2_sparse24.permuted_features`); the epilogue rounds h to
the activation dtype (as the reference's matmul output is), applies relu ** 2 rounded likewise,
selects exactly as `relu2_sparse24_ref` does (ties to the lower index; the partial last group,
F % 4 features, stays dense) and stores. Rows and groups past the input are written as zeros
(nibble 0x4) where the layout is padded.

NOTE: `h_out` (testing only) receives the kernel's own rounded pre-activations: the kernel's float32
summation order differs from the reference matmul's, and 2:4 selection is discontinuous at ties.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cslt_layout import meta_byte_sm80, meta_byte_sm90, padded_shape
from .relu2_sparse24 import (
    Sparse24,
    join_groups,
    nibble_words,
    pack_groups,
    permuted_features,
    relu2,
    relu2_sparse24_ref,
    sparsify_groups,
    split_groups,
)
from .triton_utils import check_operands, dot_acc, round_to, upcast_dots, warps_for

PRUNED, SPARSE24, CSLT90, CSLT80 = 0, 1, 2, 3  # the OUT layouts
_PRUNED, _SPARSE24, _CSLT90 = tl.constexpr(PRUNED), tl.constexpr(SPARSE24), tl.constexpr(CSLT90)  # in kernels


def up_relu2_sparse24_ref(a: torch.Tensor, w_up: torch.Tensor, two_by_four: bool = True) -> torch.Tensor:
    """Reference: sparse24(relu(a @ w_up.T) ** 2), (T, K) x (F, K) -> (T, F), in the dtype of a."""
    return relu2_sparse24_ref(a @ w_up.T, two_by_four)


@triton.jit
def _up_relu2_sparse24_kernel(
        a_ptr, w_ptr, y_ptr, meta_ptr, tail_ptr, h_ptr, num_tokens, width, k, rows_out, cols_out,
        stride_at, stride_ak, stride_wf, stride_wk, stride_yt, stride_mt, stride_tt, stride_ht,
        OUT: tl.constexpr, TWO_BY_FOUR: tl.constexpr, STORE_H: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr):
    # grid: (feature blocks over cols_out, token blocks over rows_out); y_ptr is the pruned y or
    # the values (rows_out, cols_out / 2)
    pid_f, pid_t = tl.program_id(0), tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_f = pid_f * BLOCK_F + permuted_features(BLOCK_F)  # feature of each tile column
    t_mask, f_mask = offs_t < num_tokens, offs_f < width
    acc = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k
        x = tl.load(a_ptr + offs_t[:, None] * stride_at + offs_k[None, :] * stride_ak,
                    mask=t_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_T, BLOCK_K)
        w = tl.load(w_ptr + offs_f[None, :] * stride_wf + offs_k[:, None] * stride_wk,
                    mask=f_mask[None, :] & k_mask[:, None], other=0.0)  # (BLOCK_K, BLOCK_F)
        acc = dot_acc(x, w, acc, UPCAST)
    dtype = a_ptr.dtype.element_ty
    if STORE_H:
        tl.store(h_ptr + offs_t[:, None] * stride_ht + offs_f[None, :], round_to(acc, dtype),
                 mask=t_mask[:, None] & f_mask[None, :])
    m0, m1, m2, m3 = split_groups(relu2(acc, dtype), BLOCK_T, BLOCK_F, True)  # (BLOCK_T, BLOCK_F // 4)
    offs_g = pid_f * (BLOCK_F // 4) + tl.arange(0, BLOCK_F // 4)
    body = (offs_g < width // 4)[None, :]  # groups of 4 real features; the partial last one is dense
    if OUT == _PRUNED:
        if TWO_BY_FOUR:
            m0, m1, m2, m3 = sparsify_groups(m0, m1, m2, m3, ~body)
        y = join_groups(m0, m1, m2, m3, BLOCK_T, BLOCK_F, True)
        tl.store(y_ptr + offs_t[:, None] * stride_yt + offs_f[None, :], y.to(dtype),
                 mask=t_mask[:, None] & f_mask[None, :])
    else:
        first, second, nibbles = pack_groups(m0, m1, m2, m3)
        first, second = tl.where(body, first, 0.0), tl.where(body, second, 0.0)
        nibbles = tl.where(body, nibbles, 0 if OUT == _SPARSE24 else 4)  # padding: (0, 1) of zeros
        rows_mask = offs_t < rows_out
        offs_v = pid_f * (BLOCK_F // 2) + tl.arange(0, BLOCK_F // 2)
        values = tl.reshape(tl.join(first, second), (BLOCK_T, BLOCK_F // 2))  # 2 g + (0, 1)
        tl.store(y_ptr + offs_t[:, None] * stride_yt + offs_v[None, :], values.to(dtype),
                 mask=rows_mask[:, None] & (offs_v < cols_out // 2)[None, :])
        if OUT == _SPARSE24:
            offs_w = pid_f * (BLOCK_F // 16) + tl.arange(0, BLOCK_F // 16)
            words = nibble_words(nibbles, BLOCK_T, BLOCK_F // 4)  # (BLOCK_T, BLOCK_F // 16)
            # NOTE: words are < 2^16; the int16 cast keeps their bits (two's-complement wrap)
            tl.store(meta_ptr + offs_t[:, None] * stride_mt + offs_w[None, :], words.to(tl.int16),
                     mask=rows_mask[:, None] & (offs_w < tl.cdiv(cols_out, 16))[None, :])
        elif OUT == _CSLT90:  # one byte: rows r and r + 8 of a 16-row block, one group
            pairs = tl.permute(tl.reshape(nibbles, (BLOCK_T // 16, 2, 8, BLOCK_F // 4)), (0, 2, 3, 1))
            low, high = tl.split(pairs)  # (BLOCK_T // 16, 8, BLOCK_F // 4): rows 16 i + r, 16 i + 8 + r
            rows = pid_t * BLOCK_T + 16 * tl.arange(0, BLOCK_T // 16)[:, None, None] + \
                tl.arange(0, 8)[None, :, None]
            cols = 4 * offs_g[None, None, :]
            tl.store(meta_ptr + meta_byte_sm90(rows, cols, cols_out), (low | (high << 4)).to(tl.uint8),
                     mask=(rows < rows_out) & (cols < cols_out))
        else:  # CSLT80, one byte: groups 2 p and 2 p + 1 of one row
            low, high = tl.split(tl.reshape(nibbles, (BLOCK_T, BLOCK_F // 8, 2)))
            cols = 8 * (pid_f * (BLOCK_F // 8) + tl.arange(0, BLOCK_F // 8))[None, :]
            tl.store(meta_ptr + meta_byte_sm80(offs_t[:, None], cols, rows_out),
                     (low | (high << 4)).to(tl.uint8), mask=rows_mask[:, None] & (cols < cols_out))
        if width % 4 != 0:  # the dense tail y[:, 4 G:], from the program that holds it
            if pid_f == (width // 4) // (BLOCK_F // 4):
                y = join_groups(m0, m1, m2, m3, BLOCK_T, BLOCK_F, True)
                tail = offs_f - 4 * (width // 4)
                tl.store(tail_ptr + offs_t[:, None] * stride_tt + tail[None, :], y.to(dtype),
                         mask=t_mask[:, None] & ((tail >= 0) & f_mask)[None, :])


def _blocks(num_tokens: int, k: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_F, BLOCK_K): 128x128 tiles for many tokens, narrower ones for few, so that
    decode's weight read is spread over ~F / 32 programs; small ones in float32 (FMA dots, which
    spill at 64x64, `inspect_kernels.py`)."""
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    if dtype == torch.float32:
        return (16 if num_tokens <= 16 else 32), 32, min(block_k, 32)
    if num_tokens <= 16:
        return 16, 32, block_k
    if num_tokens <= 64:
        return 64, 64, block_k
    return 128, 128, block_k


def _launch(a, w_up, y, meta, tail, h_out, rows_out, cols_out, out, two_by_four, block_t=None):
    check_operands(a, w_up)
    (num_tokens, k), width = a.shape, w_up.shape[0]
    assert w_up.shape[1] == k, (a.shape, w_up.shape)
    bt, bf, bk = _blocks(num_tokens, k, a.dtype)
    if out != PRUNED:  # NOTE: the packing epilogue spills at 128 features on sm80
        bf = min(bf, 64)
    if out in (CSLT90, CSLT80):
        bt = 64  # NOTE: tiles inside the layout's 64-row strips / 128-row blocks (16-bit only)
    bt = block_t or bt
    if h_out is not None:
        check_operands(a, h_out)
        assert h_out.shape == (num_tokens, width), h_out.shape
    h = y if h_out is None else h_out
    grid = (triton.cdiv(max(cols_out, width), bf), triton.cdiv(rows_out, bt))
    _up_relu2_sparse24_kernel[grid](
        a, w_up, y, meta, tail, h, num_tokens, width, k, rows_out, cols_out,
        a.stride(0), a.stride(1), w_up.stride(0), w_up.stride(1), y.stride(0), meta.stride(0),
        tail.stride(0), h.stride(0),
        OUT=out, TWO_BY_FOUR=two_by_four, STORE_H=h_out is not None, UPCAST=upcast_dots(a.dtype),
        BLOCK_T=bt, BLOCK_F=bf, BLOCK_K=bk, num_warps=warps_for(bt), num_stages=3)


def up_relu2_sparse24(a: torch.Tensor, w_up: torch.Tensor, two_by_four: bool = True,
                      h_out: torch.Tensor | None = None) -> torch.Tensor:
    """`up_relu2_sparse24_ref(a, w_up, two_by_four)`: the pruned (T, F) activation, one kernel."""
    num_tokens, width = a.shape[0], w_up.shape[0]
    y = a.new_empty(num_tokens, width)
    if num_tokens > 0 and width > 0:
        _launch(a, w_up, y, y, y, h_out, num_tokens, width, PRUNED, two_by_four)
    return y


def up_relu2_sparse24_compress(a: torch.Tensor, w_up: torch.Tensor,
                               h_out: torch.Tensor | None = None) -> Sparse24:
    """`sparse24_compress_ref(up_relu2_sparse24_ref(a, w_up, False))` as one kernel."""
    num_tokens, width = a.shape[0], w_up.shape[0]
    groups = width // 4
    values = a.new_empty(num_tokens, 2 * groups)
    meta = torch.empty(num_tokens, triton.cdiv(groups, 4), dtype=torch.int16, device=a.device)
    tail = a.new_empty(num_tokens, width % 4)
    if num_tokens > 0 and width > 0:
        _launch(a, w_up, values, meta, tail, h_out, num_tokens, 4 * groups, SPARSE24, True)
    return Sparse24(values, meta, tail)


def up_relu2_sparse24_cslt(a: torch.Tensor, w_up: torch.Tensor, arch: int,
                           h_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cuSPARSELt's compressed buffer of the 2:4 body (M_pad, 9 K_pad / 16) and the dense tail
    (T, F % 4): `cslt_layout.cslt_compress_ref` of the zero-padded pruned body, in one kernel."""
    if a.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"cuSPARSELt's compressed layout is 16-bit; got {a.dtype}")
    num_tokens, width = a.shape[0], w_up.shape[0]
    rows, cols = padded_shape(num_tokens, width - width % 4, arch)
    buf = a.new_empty(rows, 9 * cols // 16)
    flat = buf.view(-1)
    values, meta = flat[:rows * cols // 2].view(rows, cols // 2), flat[rows * cols // 2:].view(torch.uint8)
    tail = a.new_empty(num_tokens, width % 4)
    _launch(a, w_up, values, meta.view(1, -1), tail, h_out, rows, cols, CSLT90 if arch == 90 else CSLT80, True)
    return buf, tail
