"""Compute kernels of elas-serve: each file owns one kernel, its launcher and its PyTorch reference.

The references are both the CPU path and the test oracle; the Triton versions are used on CUDA.
This package imports nothing from models/ or the application.
"""

from .ffn import (
    FFN_BACKEND_NAMES,
    FFN_BACKENDS,
    ffn_dense,
    ffn_dense_chain,
    ffn_fused,
    ffn_reference,
    ffn_sparse24,
    project,
)
from .ffn_fused import relu2_sparse24_ffn, relu2_sparse24_ffn_ref
from .gemm_relu2_sparse24 import (
    up_relu2_sparse24,
    up_relu2_sparse24_compress,
    up_relu2_sparse24_cslt,
    up_relu2_sparse24_ref,
)
from .relu2_sparse24 import (
    Sparse24,
    relu2_sparse24_compress,
    relu2_sparse24_pruned,
    relu2_sparse24_ref,
    sparse24_compress_ref,
    sparse24_decompress_ref,
    sparse24_keep_mask,
    sparse24_ref,
)
from .sparse24_gemv import sparse24_gemv, sparse24_gemv_ref
from .sparse24_matmul import sparse24_matmul, sparse24_matmul_ref

__all__ = [
    "FFN_BACKENDS", "FFN_BACKEND_NAMES", "Sparse24", "ffn_dense", "ffn_dense_chain", "ffn_fused",
    "ffn_reference", "ffn_sparse24", "project", "relu2_sparse24_compress", "relu2_sparse24_ffn",
    "relu2_sparse24_ffn_ref", "relu2_sparse24_pruned", "relu2_sparse24_ref", "sparse24_compress_ref",
    "sparse24_decompress_ref", "sparse24_gemv", "sparse24_gemv_ref", "sparse24_keep_mask",
    "sparse24_matmul", "sparse24_matmul_ref", "sparse24_ref", "up_relu2_sparse24",
    "up_relu2_sparse24_compress", "up_relu2_sparse24_cslt", "up_relu2_sparse24_ref",
]
