"""`torch.compile(fullgraph=True)` traces through every FFN backend without a graph break (the Triton
launchers are custom ops with fake implementations, `kernels/ops.py`), and the compiled function
computes what the eager one does.

On the CPU the ops' bodies run the kernels under the Triton interpreter. `aot_eager` traces each
backend (dynamo + fake tensors + functionalization: where graph breaks and fake-shape mistakes show)
without generating code; one test also compiles with inductor, dynamic token counts included.
Run: python -m pytest tests/test_kernels_torch_compile.py -v
"""

from __future__ import annotations

import functools

import pytest
import torch

from elas_serve.kernels.ffn import FFN_BACKENDS, ffn_dense_chain, ffn_sparse24

BACKENDS = {"dense": FFN_BACKENDS["dense"], "dense_chain": ffn_dense_chain, "fused": FFN_BACKENDS["fused"],
            "sparse24": FFN_BACKENDS["sparse24"], "sparse24_triton": functools.partial(ffn_sparse24, gemm="triton")}


def _ffn(num_tokens: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden, width, rank = 32, 131, 16
    x = torch.randn(num_tokens, hidden, generator=g)
    up = (torch.randn(hidden, rank, generator=g) / hidden ** 0.5, torch.randn(width, rank, generator=g) / rank ** 0.5)
    down = (torch.randn(width, rank, generator=g) / width ** 0.5, torch.randn(hidden, rank, generator=g) / rank ** 0.5)
    return x.to(dtype), tuple(t.to(dtype) for t in up), tuple(t.to(dtype) for t in down)


def _block(fn):
    """A small model-like function around one FFN: residual, norm-like scaling, FFN."""
    def block(x, up, down):
        h = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)
        return x + fn(h, up, down, True)
    return block


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("num_tokens", [5, 33])
def test_backend_traces_fullgraph(name, num_tokens):
    torch._dynamo.reset()
    x, up, down = _ffn(num_tokens)
    block = _block(BACKENDS[name])
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x, up, down), block(x, up, down), rtol=1e-5, atol=1e-5)


def test_inductor_with_dynamic_tokens():
    torch._dynamo.reset()
    block = _block(FFN_BACKENDS["fused"])
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    with torch.inference_mode():
        for num_tokens in (7, 20):
            x, up, down = _ffn(num_tokens, seed=num_tokens)
            torch.testing.assert_close(compiled(x, up, down), block(x, up, down), rtol=1e-5, atol=1e-5)


def test_ops_have_fake_implementations():
    x, up, down = _ffn(4, dtype=torch.bfloat16)
    a = x @ up[0]
    with torch._subclasses.FakeTensorMode() as mode:
        a = mode.from_tensor(a)
        w_up, w_down = mode.from_tensor(up[1]), mode.from_tensor(down[0])
        assert torch.ops.elas.up_relu2_sparse24(a, w_up, True).shape == (4, 131)
        assert torch.ops.elas.relu2_sparse24_ffn(a, w_up, w_down, True).shape == (4, 16)
        assert torch.ops.elas.sparse24_down(a, w_up, w_down, "auto").shape == (4, 16)
