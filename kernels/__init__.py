"""Compute kernels of elas-serve: each file owns one kernel, its launcher and its PyTorch reference.

The references are both the CPU path and the test oracle; the Triton versions are used on CUDA.
"""

from .relu2_sparse24 import relu2_sparse24_ref, sparse24_keep_mask, sparse24_ref

__all__ = ["relu2_sparse24_ref", "sparse24_keep_mask", "sparse24_ref"]
