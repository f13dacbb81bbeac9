"""Compute kernels of elas-serve: each file owns one kernel, its launcher and its PyTorch reference.

The references are both the CPU path and the test oracle; the Triton versions are used on CUDA.
This package imports nothing from models/ or the application. Importing it is cheap: the names
below load their module (and Triton) on first use, so `kernels.backends`, the list of FFN backend
names, can be read by the CLI and the load tester without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "ffn": ("FFN_BACKENDS", "ffn_dense", "ffn_dense_chain", "ffn_fused", "ffn_reference", "ffn_sparse24", "project"),
    "backends": ("FFN_BACKEND_NAMES", "TRITON_BACKENDS"),
    "ffn_fused": ("relu2_sparse24_ffn", "relu2_sparse24_ffn_ref"),
    "gemm_relu2_sparse24": ("up_relu2_sparse24", "up_relu2_sparse24_compress", "up_relu2_sparse24_cslt",
                            "up_relu2_sparse24_ref"),
    "relu2_sparse24": ("Sparse24", "relu2_sparse24_compress", "relu2_sparse24_pruned", "relu2_sparse24_ref",
                       "sparse24_compress_ref", "sparse24_decompress_ref", "sparse24_keep_mask", "sparse24_ref"),
    "sparse24_gemv": ("sparse24_gemv", "sparse24_gemv_ref"),
    "sparse24_matmul": ("sparse24_matmul", "sparse24_matmul_ref"),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'elas_serve.kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
