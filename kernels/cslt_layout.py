"""cuSPARSELt's compressed layout of a 2:4 matrix (16-bit values), as a documented Python model and
the Triton index functions the producer kernel (`gemm_relu2_sparse24.py`) writes it with.

`torch._cslt_compress(A)` of a 2:4-pruned row-major A (M, K), bf16 or fp16, returns one buffer of
M * K * 9 / 16 elements: first the values, then the metadata.

Values (M * K / 2 elements, row-major (M, K / 2)): for every group g of 4 columns of row m, the 2
kept entries in column order, `values[m, 2g]`, `values[m, 2g + 1]` (the `Sparse24` values).

Metadata (M * K / 8 bytes): one nibble per group, `i0 | i1 << 2` for kept columns i0 < i1 of the
group (0x4, 0x8, 0x9, 0xC, 0xD, 0xE), 2 nibbles per byte (the low nibble first), in an
architecture-specific order. Nibble n of the metadata is bits 4 (n % 2) .. 4 (n % 2) + 3 of byte
n // 2. With c = 4g the group's first column:

sm90 (Hopper), rows padded to 64, columns to 64: 64-row strips, each a run of 32-column chunks of
512 nibbles; a chunk is four 16-row blocks of 128 nibbles; in a block, row r (0..7) and r + 8 share
the 16 nibbles at 16 r:
    n = (m // 64) * 16 K + (c // 32) * 512 + ((m % 64) // 16) * 128 + (m % 8) * 16
        + ((c % 16) // 4) * 4 + ((m % 16) // 8) + 2 ((c % 32) // 16)
i.e. one 16-bit word holds the groups k and k + 4 (of a chunk's 8) of rows r and r + 8. Derived from
torchao's `sparse24_sm90_sparsify` ("cusparselt" format: the 64x64 CTA tile and its metadata index
`(col / 32) * 256 + (row % 8) * 8 + ((row % 64) / 16) * 64 + (row / 64) * 8 * K` bytes, followed by
its two-shuffle word reordering), and the same as FlagGems' decoder of `_cslt_compress` output,
which was checked against the native op on Hopper (research notes, sparsity.md, appendix A).

sm80 (Ampere), rows and columns padded to 128: 128x64 blocks, column-major over the blocks, of 512
words (1024 bytes); a block is 8 tiles of 32x32 (column-major, 64 words each); a 16-bit word holds
16 consecutive columns (4 groups, the lowest lowest) of one row; in a tile, row r = 16 R + 8 h + i:
    word = ((c // 64) * (M // 128) + m // 128) * 512 + ((c % 64) // 32) * 256 + ((m % 128) // 32) * 64
           + (i // 4) * 32 + (i % 4) * 8 + R * 4 + ((c % 32) // 16) * 2 + h
    n = 4 word + (c % 16) // 4
Derived from PyTorch's cuSPARSELt packer for sm8x (`MetadataCuSparseLt` and `warp_shuffle_meta` in
aten/src/ATen/native/sparse/cuda), which feeds `_cslt_sparse_mm` the same way `_cslt_compress` does.

NOTE: both orders are reverse-engineered by others, not documented by NVIDIA, and may change with
cuSPARSELt versions. The GPU tests compare this model with `torch._cslt_compress` bit for bit, and
the runtime (`sparse24_cslt.py`) checks the producer against `_cslt_compress` once per device and
dtype before trusting it. Where a group keeps a zero (relu's own zeros), which zero is "kept" is a
choice: the model keeps ties at the lower index, as the selection does; cuSPARSELt may pick another
position for the zero, which changes bits but not the matrix (the tests compare both ways).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl  # noqa: F401 - @triton.jit functions here need `tl` in scope

from .relu2_sparse24 import sparse24_compress_ref

CSLT_ARCHS = (80, 90)
PAD = {90: (64, 64), 80: (128, 128)}  # (rows, columns) multiples the layouts are defined for


def padded_shape(rows: int, cols: int, arch: int) -> tuple[int, int]:
    """(rows, cols) rounded up to the multiples the `arch` layout needs (at least one tile)."""
    pad_m, pad_k = PAD[arch]
    return max(pad_m, triton.cdiv(rows, pad_m) * pad_m), max(pad_k, triton.cdiv(cols, pad_k) * pad_k)


def nibble_index(m: torch.Tensor, c: torch.Tensor, rows: int, cols: int, arch: int) -> torch.Tensor:
    """Metadata nibble index of the group starting at column `c` of row `m` (broadcast)."""
    if arch == 90:
        return ((m // 64) * 16 * cols + (c // 32) * 512 + ((m % 64) // 16) * 128 + (m % 8) * 16
                + ((c % 16) // 4) * 4 + (m % 16) // 8 + 2 * ((c % 32) // 16))
    if arch == 80:
        r = m % 32
        i = r % 8
        word = (((c // 64) * (rows // 128) + m // 128) * 512 + ((c % 64) // 32) * 256
                + ((m % 128) // 32) * 64 + (i // 4) * 32 + (i % 4) * 8 + (r // 16) * 4
                + ((c % 32) // 16) * 2 + (r % 16) // 8)
        return 4 * word + (c % 16) // 4
    raise ValueError(f"no cuSPARSELt layout model for sm{arch} (have {CSLT_ARCHS})")


def _check_shape(rows: int, cols: int, arch: int) -> None:
    pad_m, pad_k = PAD[arch]
    if rows % pad_m or cols % pad_k:
        raise ValueError(f"sm{arch} cuSPARSELt layout needs rows % {pad_m} == 0 and cols % {pad_k} "
                         f"== 0, got ({rows}, {cols}); see padded_shape")


def cslt_compress_ref(y: torch.Tensor, arch: int) -> torch.Tensor:
    """The compressed buffer (rows, 9 * cols / 16) of a 2:4 matrix `y` (rows, cols), 16-bit.

    Groups with more than 2 non-zeros are pruned to their top 2 (ties to the lower index), as
    `sparse24_compress_ref` does. The buffer's shape is 2-D with `rows` rows, as newer torch builds
    give `_cslt_compress`; only its flat contents are the layout.
    """
    assert y.dtype in (torch.bfloat16, torch.float16) and y.dim() == 2, (y.dtype, y.shape)
    rows, cols = y.shape
    _check_shape(rows, cols, arch)
    packed = sparse24_compress_ref(y)  # values (rows, cols / 2), meta words (rows, cols / 16)
    shifts = torch.arange(0, 16, 4, device=y.device)
    nibbles = (packed.meta.int()[..., None] >> shifts) & 0xF  # (rows, cols / 16, 4)
    nibbles = nibbles.flatten(1)  # (rows, cols / 4), group g at column 4 g
    m = torch.arange(rows, device=y.device)[:, None]
    c = 4 * torch.arange(cols // 4, device=y.device)[None, :]
    index = nibble_index(m, c, rows, cols, arch).flatten()
    meta = torch.zeros(rows * cols // 4, dtype=nibbles.dtype, device=y.device)
    meta[index] = nibbles.flatten()
    assert int(torch.bincount(index, minlength=meta.numel()).max()) == 1, "layout model is not a bijection"
    meta_bytes = (meta[0::2] | (meta[1::2] << 4)).to(torch.uint8)  # (rows * cols / 8,)
    flat = torch.cat((packed.values.flatten().view(torch.uint8), meta_bytes)).view(y.dtype)
    return flat.view(rows, 9 * cols // 16)


def cslt_decompress_ref(buf: torch.Tensor, rows: int, cols: int, arch: int) -> torch.Tensor:
    """The dense (rows, cols) matrix a compressed buffer stands for (zeros at dropped positions)."""
    _check_shape(rows, cols, arch)
    flat = buf.flatten()
    assert flat.numel() == rows * cols * 9 // 16, (buf.shape, rows, cols)
    values = flat[:rows * cols // 2].view(rows, cols // 4, 2)
    meta = flat[rows * cols // 2:].view(torch.uint8).int()
    nib_all = torch.stack((meta & 0xF, meta >> 4), dim=-1).flatten()  # nibble n at n
    m = torch.arange(rows, device=buf.device)[:, None]
    c = 4 * torch.arange(cols // 4, device=buf.device)[None, :]
    nibbles = nib_all[nibble_index(m, c, rows, cols, arch)]  # (rows, cols / 4)
    kept = torch.stack((nibbles & 3, nibbles >> 2), dim=-1).long()  # (rows, cols / 4, 2)
    dense = values.new_zeros(rows, cols // 4, 4).scatter(-1, kept, values)
    return dense.flatten(1)


@triton.jit
def meta_byte_sm90(m, c, cols):
    """Byte offset (in the metadata) of the byte holding rows m and m + 8's nibbles of the group at
    column c, for rows m with m % 16 < 8 (see the module docstring; nibble m % 16 // 8 == 0)."""
    n = ((m // 64) * 16 * cols + (c // 32) * 512 + ((m % 64) // 16) * 128 + (m % 8) * 16
         + ((c % 16) // 4) * 4 + 2 * ((c % 32) // 16))
    return n // 2


@triton.jit
def meta_byte_sm80(m, c, rows):
    """Byte offset (in the metadata) of the byte holding the nibbles of the groups at columns c and
    c + 4 of row m, for c % 8 == 0 (see the module docstring)."""
    r = m % 32
    i = r % 8
    word = (((c // 64) * (rows // 128) + m // 128) * 512 + ((c % 64) // 32) * 256
            + ((m % 128) // 32) * 64 + (i // 4) * 32 + (i % 4) * 8 + (r // 16) * 4
            + ((c % 32) // 16) * 2 + (r % 16) // 8)
    return 2 * word + (c % 16) // 8
