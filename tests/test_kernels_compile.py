"""The Triton kernels compile for the GPU (sm90 cubins, bf16) without a GPU: what the interpreter
cannot check (layouts, dot shapes and dtypes as the compiler sees them).

The compilation runs in a subprocess without TRITON_INTERPRET (under the interpreter `triton.jit`
yields no compilable function) and with a fresh cache, so every run really compiles.
Run: python -m pytest tests/test_kernels_compile.py -v
"""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from elas_serve.kernels.ffn_fused import _relu2_sparse24_ffn_kernel
from elas_serve.kernels.relu2_sparse24 import _relu2_sparse24_compress_kernel
from elas_serve.kernels.sparse24_matmul import _sparse24_matmul_kernel


def compile_sm90(fn, pointers, constexprs, num_warps):
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in fn.arg_names}
    triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps})


bf16 = "*bf16"
compile_sm90(_relu2_sparse24_compress_kernel,
             {"h_ptr": bf16, "out_ptr": bf16, "meta_ptr": "*i16", "tail_ptr": bf16},
             {"PRUNED": False, "TAIL": 3, "BLOCK_T": 16, "BLOCK_G": 64}, 4)
compile_sm90(_sparse24_matmul_kernel,
             {"values_ptr": bf16, "meta_ptr": "*i16", "tail_ptr": bf16, "w_ptr": bf16, "out_ptr": bf16},
             {"TAIL": 3, "UPCAST": False, "BLOCK_T": 64, "BLOCK_G": 32, "BLOCK_N": 128}, 8)
compile_sm90(_relu2_sparse24_ffn_kernel,
             {"a_ptr": bf16, "wu_ptr": bf16, "wd_ptr": bf16, "out_ptr": bf16, "h_ptr": bf16},
             {"TWO_BY_FOUR": True, "STORE_H": True, "UPCAST": False, "BLOCK_T": 64, "BLOCK_G": 16,
              "BLOCK_K": 64, "BLOCK_N": 128}, 8)
print("compiled")
'''


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
