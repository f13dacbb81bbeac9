"""The names of the FFN backends: the one list that configs, command lines, the engine and the load
tester read (dispatch is `ffn.FFN_BACKENDS`, with the same names but "auto"). No imports: reading
it costs nothing.

- `dense`: PyTorch on the CPU; on CUDA the up GEMM with relu² + 2:4 in its epilogue, then the down;
- `sparse24`: relu² + 2:4 compressed, then a 2:4 GEMM (cuSPARSELt where usable, else Triton);
- `fused`: one Triton kernel from the up projection to the down projection's first factor;
- `auto`: the fastest measured per token count (`ffn_tuning.py`); `dense` on the CPU.
"""

FFN_BACKEND_NAMES: tuple[str, ...] = ("auto", "dense", "sparse24", "fused")
TRITON_BACKENDS: tuple[str, ...] = ("sparse24", "fused")  # CUDA, or the Triton interpreter on the CPU
