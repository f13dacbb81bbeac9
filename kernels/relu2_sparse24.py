"""Squared ReLU followed by 2:4 activation sparsity: the PyTorch reference, the compressed layout,
and the Triton kernel that fuses squared ReLU, top-2-of-4 selection and compression.

Semantics (design section 3, "naive" method): `y = relu(h) ** 2` in the dtype of `h`; in every group
of 4 consecutive features keep exactly the 2 of largest magnitude, ties going to the lower index;
when the width `F` is not a multiple of 4, the last `F % 4` features stay dense. The references are
the CPU path of the `dense` FFN backend and the oracle every kernel is tested against.

Compressed layout (`Sparse24`) of `y` (T, F), with G = F // 4 groups in the 4-aligned body:
  values (T, 2G), dtype of y:  values[t, 2g] = y[t, 4g + i0], values[t, 2g + 1] = y[t, 4g + i1],
                               where i0 < i1 are the kept positions of group g;
  meta   (T, ceil(G/4)) int16: nibble g % 4 of meta[t, g // 4] (bits 4(g%4)..4(g%4)+3, low nibble
                               = lowest group) is `i0 | i1 << 2`; nibbles past group G-1 are 0
                               (the same nibbles and word order as PyTorch's CUTLASS metadata
                               before its tile reordering);
  tail   (T, F % 4), dtype of y: the dense tail y[:, 4G:].
Both values and meta are row-major with unit inner stride.

NOTE: with 4 values, "rank < 2" needs only the 6 pairwise comparisons b_ij = (|v_i| >= |v_j|) for
i < j (ties go to the lower index i); the same branch-free formula is what the kernels compute.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .triton_utils import check_operands, round_to


class Sparse24(NamedTuple):
    values: torch.Tensor  # (T, 2G)
    meta: torch.Tensor  # (T, ceil(G/4)) int16
    tail: torch.Tensor  # (T, F % 4)

    @property
    def width(self) -> int:
        return 2 * self.values.shape[1] + self.tail.shape[1]


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _top2_of_4(a: torch.Tensor) -> torch.Tensor:
    """Keep flags (..., G, 4) bool of the magnitudes `a` (..., G, 4): the rank formula of the NOTE.

    NOTE: rank_j < 2 rewritten on the 6 comparisons as uint8 0/1 (a bool's bytes, viewed for free):
    r0 = 3 - b01 - b02 - b03 < 2  <=>  b01 + b02 + b03 >= 2
    r1 = b01 + 2 - b12 - b13 < 2  <=>  b01 < b12 + b13
    r2 = b02 + b12 + 1 - b23 < 2  <=>  b02 + b12 <= b23
    r3 = b03 + b13 + b23 < 2
    Same flags as the kernels' `top2_of_4` for every input, NaN included (a NaN compares false
    with everything in both). 6 compares and 10 small integer ops on (..., G) strided views: the
    eager CPU cost is per op (a few us each at decode sizes), and a compare or select mixing floats
    with bools costs ~1 ns per element, integer ops a fraction of that.
    """
    v0, v1, v2, v3 = a.unbind(-1)  # (..., G) each, stride 4
    b01, b02, b03 = (v0 >= v1).view(torch.uint8), (v0 >= v2).view(torch.uint8), (v0 >= v3).view(torch.uint8)
    b12, b13, b23 = (v1 >= v2).view(torch.uint8), (v1 >= v3).view(torch.uint8), (v2 >= v3).view(torch.uint8)
    return torch.stack((b01 + b02 + b03 >= 2, b01 < b12 + b13, b02 + b12 <= b23, b03 + b13 + b23 < 2), dim=-1)


def _groups(y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the 4-aligned body of `y` (..., F) viewed as (..., G, 4), its width 4G)."""
    width = y.shape[-1]
    body = width - width % 4
    return y[..., :body].unflatten(-1, (body // 4, 4)), body


def _masked_into(y4: torch.Tensor, keep: torch.Tensor, out4: torch.Tensor) -> None:
    """out4 = y4 where keep else +0.0, bit for bit, as an integer AND (NaN and inf pass untouched).

    NOTE: `torch.where(keep, y, 0)` or `masked_fill` mixes bools with floats (~1 ns per element on
    the CPU); an AND with an all-ones/all-zeros integer word is 3-8x cheaper at (32, 2064).
    """
    if torch.compiler.is_compiling():  # NOTE: inductor fuses a select; `out=` into views does not trace
        out4.copy_(torch.where(keep, y4, torch.zeros((), dtype=y4.dtype, device=y4.device)))
        return
    itype = _INT_OF_SIZE[y4.element_size()]
    word = keep.to(itype).neg_()  # (..., G, 4): -1 (all bits set) where kept, 0 where dropped
    torch.bitwise_and(y4.view(itype), word, out=out4.view(itype))


def sparse24_keep_mask(y: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the kept features of `y` (..., F): 2 of every 4, dense tail kept."""
    y4, body = _groups(y)
    keep = _top2_of_4(y4.abs()).flatten(-2)  # (..., body)
    if body == y.shape[-1]:
        return keep
    tail = torch.ones(*y.shape[:-1], y.shape[-1] - body, dtype=torch.bool, device=y.device)
    return torch.cat((keep, tail), dim=-1)


def sparse24_ref(y: torch.Tensor) -> torch.Tensor:
    """`y` with the 2 smallest-magnitude entries of every group of 4 set to zero."""
    if y.requires_grad and torch.is_grad_enabled():  # differentiable: the mask's gradient
        return torch.where(sparse24_keep_mask(y), y, torch.zeros((), dtype=y.dtype, device=y.device))
    y4, body = _groups(y)
    out = torch.empty_like(y) if body == y.shape[-1] else y.clone()  # the tail is y's
    _masked_into(y4, _top2_of_4(y4.abs()), _groups(out)[0])
    return out


def sparse24_(y: torch.Tensor, nonnegative: bool = False) -> torch.Tensor:
    """`sparse24_ref(y)` written into `y` itself (a temporary the caller owns); returns `y`.

    With `nonnegative` (y is relu(h) ** 2: >= 0 or NaN) the magnitudes are y itself: the same
    comparisons as on |y| (the sign of a zero or a NaN changes no comparison), one op fewer.
    """
    y4, _ = _groups(y)
    _masked_into(y4, _top2_of_4(y4 if nonnegative else y4.abs()), y4)
    return y


def relu2_sparse24_ref(h: torch.Tensor, two_by_four: bool = True) -> torch.Tensor:
    """`sparse24(relu(h) ** 2)` (or just `relu(h) ** 2`), in the dtype of `h`."""
    y = torch.relu(h).square()
    if not two_by_four:
        return y
    return sparse24_ref(y) if y.requires_grad and torch.is_grad_enabled() else sparse24_(y, nonnegative=True)


def relu2_sparse24_(h: torch.Tensor, two_by_four: bool = True) -> torch.Tensor:
    """`relu2_sparse24_ref(h)` computed in place in `h` (a temporary the caller owns); returns `h`.

    The same values bit for bit: relu_ and square_ are relu and square without the allocation.
    """
    y = torch.relu_(h).square_()
    return sparse24_(y, nonnegative=True) if two_by_four else y


def sparse24_compress_ref(y: torch.Tensor) -> Sparse24:
    """Reference compression of `y` (T, F) into the `Sparse24` layout (2:4 selection included)."""
    num_tokens, width = y.shape
    groups = width // 4
    body = y[:, :4 * groups].reshape(num_tokens, groups, 4)  # (T, G, 4)
    keep = _top2_of_4(body.abs())  # (T, G, 4), exactly 2 per group (NaN aside)
    pos = torch.arange(4, device=y.device).expand_as(keep)
    kept = pos[keep].view(num_tokens, groups, 2)  # (T, G, 2): i0 < i1
    values = body.gather(-1, kept).reshape(num_tokens, 2 * groups)  # (T, 2G)
    nibbles = kept[..., 0] | (kept[..., 1] << 2)  # (T, G)
    nibbles = torch.nn.functional.pad(nibbles, (0, -groups % 4))  # (T, 4 * ceil(G/4))
    shifts = torch.arange(0, 16, 4, device=y.device)
    words = (nibbles.view(num_tokens, -1, 4) << shifts).sum(-1)  # (T, ceil(G/4)) in [0, 2^16)
    meta = torch.where(words >= 2 ** 15, words - 2 ** 16, words).to(torch.int16)
    return Sparse24(values, meta, y[:, 4 * groups:])


def sparse24_decompress_ref(a: Sparse24) -> torch.Tensor:
    """The dense (T, F) activation a `Sparse24` stands for (zeros at dropped positions)."""
    values, meta, tail = a
    num_tokens, groups = values.shape[0], values.shape[1] // 2
    shifts = torch.arange(0, 16, 4, device=meta.device)
    nibbles = ((meta.int()[..., None] >> shifts) & 0xF).flatten(1)[:, :groups]  # (T, G)
    kept = torch.stack((nibbles & 3, nibbles >> 2), dim=-1).long()  # (T, G, 2)
    body = values.new_zeros(num_tokens, groups, 4).scatter(-1, kept, values.view(num_tokens, groups, 2))
    return torch.cat((body.flatten(1), tail), dim=1)


@triton.jit
def relu2(h, DTYPE: tl.constexpr):
    """relu(h) ** 2 rounded to DTYPE, with h first rounded to DTYPE (as the reference sees it).

    NOTE: `where(h < 0, 0, h)`, not `maximum(h, 0)`: on the GPU `maximum` turns NaN into 0, while
    `torch.relu` (the reference) propagates it.
    """
    r = round_to(h.to(tl.float32), DTYPE).to(tl.float32)
    r = tl.where(r < 0.0, 0.0, r)
    return round_to(r * r, DTYPE)


@triton.jit
def top2_of_4(y0, y1, y2, y3):
    """Keep flags of the 2 largest of 4 non-negative values, ties to the lower index."""
    y0, y1, y2, y3 = y0.to(tl.float32), y1.to(tl.float32), y2.to(tl.float32), y3.to(tl.float32)
    b01, b02, b03 = (y0 >= y1).to(tl.int32), (y0 >= y2).to(tl.int32), (y0 >= y3).to(tl.int32)
    b12, b13, b23 = (y1 >= y2).to(tl.int32), (y1 >= y3).to(tl.int32), (y2 >= y3).to(tl.int32)
    r0 = 3 - b01 - b02 - b03  # rank_j = number of entries that beat entry j
    r1 = b01 + 2 - b12 - b13
    r2 = b02 + b12 + 1 - b23
    r3 = b03 + b13 + b23
    return r0 < 2, r1 < 2, r2 < 2, r3 < 2


# --- tile helpers: a (BLOCK_T, BLOCK_F) tile seen as (BLOCK_T, BLOCK_F // 4) groups of 4 ----------
# A GEMM kernel may compute its tile with the columns permuted (`permuted_features`): column
# j = 16b + 8jj + 2q + e holds feature 16b + 4q + 2jj + e, so the 4 members (m = 2jj + e) of a group
# sit in the register pairs a tensor-core accumulator gives one thread (2 adjacent columns, and the
# same 2 columns 8 further on, in mma.sync and wgmma layouts alike): splitting the tile into its
# groups then moves no data between threads.


@triton.jit
def permuted_features(BLOCK_F: tl.constexpr):
    """Feature offset, within a block of BLOCK_F, of each of its BLOCK_F permuted tile columns."""
    j = tl.arange(0, BLOCK_F)
    return (j // 16) * 16 + ((j % 8) // 2) * 4 + ((j % 16) // 8) * 2 + j % 2


@triton.jit
def split_groups(x, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, PERMUTED: tl.constexpr):
    """Members 0..3, each (BLOCK_T, BLOCK_F // 4), of the groups of 4 features of tile `x`."""
    if PERMUTED:
        x = tl.permute(tl.reshape(x, (BLOCK_T, BLOCK_F // 16, 2, 4, 2)), (0, 1, 3, 2, 4))
    x = tl.reshape(x, (BLOCK_T, BLOCK_F // 4, 2, 2))  # [t, g, jj, e]: member 2 * jj + e
    even, odd = tl.split(x)
    m0, m2 = tl.split(even)
    m1, m3 = tl.split(odd)
    return m0, m1, m2, m3


@triton.jit
def join_groups(m0, m1, m2, m3, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, PERMUTED: tl.constexpr):
    """The inverse of `split_groups`."""
    x = tl.join(tl.join(m0, m2), tl.join(m1, m3))  # (BLOCK_T, BLOCK_F // 4, 2, 2)
    if PERMUTED:
        x = tl.permute(tl.reshape(x, (BLOCK_T, BLOCK_F // 16, 4, 2, 2)), (0, 1, 3, 2, 4))
    return tl.reshape(x, (BLOCK_T, BLOCK_F))


@triton.jit
def sparsify_groups(m0, m1, m2, m3, dense):
    """Members with the 2 smallest of each group zeroed, unless `dense` (the partial last group)."""
    k0, k1, k2, k3 = top2_of_4(m0, m1, m2, m3)
    return (tl.where(k0 | dense, m0, 0.0), tl.where(k1 | dense, m1, 0.0),
            tl.where(k2 | dense, m2, 0.0), tl.where(k3 | dense, m3, 0.0))


@triton.jit
def pack_groups(m0, m1, m2, m3):
    """The kept values (first, second) and the nibble `i0 | i1 << 2` of each group."""
    k0, k1, k2, k3 = top2_of_4(m0, m1, m2, m3)
    first = tl.where(k0, m0, tl.where(k1, m1, m2))
    second = tl.where(k3, m3, tl.where(k2, m2, m1))
    i0 = tl.where(k0, 0, tl.where(k1, 1, 2))
    i1 = tl.where(k3, 3, tl.where(k2, 2, 1))
    return first, second, i0 | (i1 << 2)


@triton.jit
def nibble_words(nibbles, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    """(BLOCK_T, BLOCK_G) nibbles -> (BLOCK_T, BLOCK_G // 4) words, the lowest group lowest."""
    shifts = tl.arange(0, 4) * 4
    return tl.sum(tl.reshape(nibbles, (BLOCK_T, BLOCK_G // 4, 4)) << shifts[None, None, :], axis=2)


@triton.jit
def _relu2_sparse24_compress_kernel(
        h_ptr, out_ptr, meta_ptr, tail_ptr, num_tokens, num_groups, rows_out, groups_out,
        stride_ht, stride_ot, stride_mt, stride_tt,
        PRUNED: tl.constexpr, TAIL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    # grid: (token blocks, group blocks) over (rows_out, groups_out); programs past the input write
    # zeros (the padding of the pruned layout). One contiguous (BLOCK_T, 4 * BLOCK_G) load per
    # program; h has a unit feature stride (the launchers make it so).
    pid_t, pid_g = tl.program_id(0), tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = pid_g * 4 * BLOCK_G + tl.arange(0, 4 * BLOCK_G)  # features
    t_in = offs_t < num_tokens
    h = tl.load(h_ptr + offs_t[:, None] * stride_ht + offs_c[None, :],
                mask=t_in[:, None] & (offs_c < 4 * num_groups)[None, :], other=0.0)
    dtype = out_ptr.dtype.element_ty
    m0, m1, m2, m3 = split_groups(relu2(h, dtype), BLOCK_T, 4 * BLOCK_G, False)
    out_row = out_ptr + offs_t[:, None] * stride_ot
    if PRUNED:  # dense (rows_out, 4 * groups_out) with the dropped entries zeroed
        y = join_groups(*sparsify_groups(m0, m1, m2, m3, False), BLOCK_T, 4 * BLOCK_G, False)
        out_mask = (offs_t < rows_out)[:, None] & (offs_c < 4 * groups_out)[None, :]
        tl.store(out_row + offs_c[None, :], y.to(dtype), mask=out_mask)
    else:  # values (T, 2G) + int16 meta (T, ceil(G/4))
        first, second, nibbles = pack_groups(m0, m1, m2, m3)
        offs_v = pid_g * 2 * BLOCK_G + tl.arange(0, 2 * BLOCK_G)
        values = tl.reshape(tl.join(first, second), (BLOCK_T, 2 * BLOCK_G))
        tl.store(out_row + offs_v[None, :], values.to(dtype),
                 mask=t_in[:, None] & (offs_v < 2 * num_groups)[None, :])
        offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
        nibbles = tl.where((offs_g < num_groups)[None, :], nibbles, 0)
        offs_w = pid_g * (BLOCK_G // 4) + tl.arange(0, BLOCK_G // 4)
        w_mask = t_in[:, None] & (offs_w < tl.cdiv(num_groups, 4))[None, :]
        # NOTE: words are < 2^16; the int16 cast keeps their bits (two's-complement wrap)
        tl.store(meta_ptr + offs_t[:, None] * stride_mt + offs_w[None, :],
                 nibble_words(nibbles, BLOCK_T, BLOCK_G).to(tl.int16), mask=w_mask)
    if TAIL > 0:
        if pid_g == 0:  # the dense tail, written by the first column of programs
            for j in tl.static_range(TAIL):
                hj = tl.load(h_ptr + offs_t * stride_ht + 4 * num_groups + j, mask=t_in, other=0.0)
                tl.store(tail_ptr + offs_t * stride_tt + j, relu2(hj, dtype), mask=t_in)


_BLOCK_T, _BLOCK_G = 16, 64


def _launch(h: torch.Tensor, out: torch.Tensor, meta: torch.Tensor, tail: torch.Tensor,
            rows_out: int, groups_out: int, pruned: bool) -> None:
    num_tokens, width = h.shape
    if h.stride(1) != 1:
        h = h.contiguous()
    grid = (triton.cdiv(rows_out, _BLOCK_T), max(1, triton.cdiv(groups_out, _BLOCK_G)))
    _relu2_sparse24_compress_kernel[grid](
        h, out, meta, tail, num_tokens, width // 4, rows_out, groups_out,
        h.stride(0), out.stride(0), meta.stride(0), tail.stride(0),
        PRUNED=pruned, TAIL=width % 4, BLOCK_T=_BLOCK_T, BLOCK_G=_BLOCK_G)


def relu2_sparse24_compress(h: torch.Tensor) -> Sparse24:
    """`sparse24_compress_ref(relu(h) ** 2)` in one pass: pre-activation h (T, F) -> `Sparse24`."""
    check_operands(h)
    num_tokens, width = h.shape
    groups = width // 4
    values = h.new_empty(num_tokens, 2 * groups)  # (T, 2G)
    meta = torch.empty(num_tokens, triton.cdiv(groups, 4), dtype=torch.int16, device=h.device)
    tail = h.new_empty(num_tokens, width % 4)  # (T, F % 4)
    if num_tokens > 0:
        _launch(h, values, meta, tail, num_tokens, groups, pruned=False)
    return Sparse24(values, meta, tail)


def relu2_sparse24_pruned(h: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2:4-pruned relu(h) ** 2 body, zero-padded to (rows, cols), and its dense tail (T, F % 4).

    This is the dense input `torch._cslt_compress` expects (its fallback path, and the GPU tests).
    """
    check_operands(h)
    num_tokens, width = h.shape
    assert rows >= num_tokens and cols % 4 == 0 and cols >= width - width % 4, (rows, cols, h.shape)
    out = h.new_empty(rows, cols)  # (rows, cols)
    tail = h.new_empty(num_tokens, width % 4)
    if rows > 0:
        _launch(h, out, out, tail, rows, cols // 4, pruned=True)
    return out, tail
