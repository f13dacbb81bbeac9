"""Triton paged attention and KV-cache store against the PyTorch references, on fresh random inputs.

On the CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1); what
the interpreter cannot see (tensor-core instructions, registers, spills, shared memory) is checked
by compiling for sm90 and sm80 in a subprocess without the interpreter. Tests marked `gpu` run the
realistic shapes on CUDA.
Run: python -m pytest tests/test_kernels_paged_attention.py -v
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from elas_serve.kernels.kv_cache_store import store_kvcache
from elas_serve.kernels.paged_attention import paged_attention_ref, store_kvcache_ref
from elas_serve.kernels.paged_attention_triton import paged_attention

TOLERANCE = {torch.float32: 5e-6, torch.bfloat16: 1.6e-2, torch.float16: 3e-3}


@dataclass
class Batch:
    q: torch.Tensor             # (T, H, D)
    cache: torch.Tensor         # (2, num_blocks, block_size, Hkv, D): every slot random
    poisoned: torch.Tensor      # the same with NaN in every slot no query may read
    block_tables: torch.Tensor  # (B, W) int32, shuffled blocks, null-block padded
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    query_lens: list[int]
    seq_lens_list: list[int]

    def kernel(self, cache: torch.Tensor | None = None) -> torch.Tensor:
        cache = self.poisoned if cache is None else cache
        return paged_attention(self.q, cache, self.block_tables, self.query_start_loc, self.seq_lens,
                               self.q.shape[-1] ** -0.5)

    def reference(self) -> torch.Tensor:
        """float32 reference on the same (rounded) inputs and the clean cache."""
        return paged_attention_ref(self.q.float(), self.cache.float(), self.block_tables, self.query_lens,
                                   self.seq_lens_list, self.q.shape[-1] ** -0.5)


def make_batch(specs: list[tuple[int, int]], block_size: int, num_heads: int, num_kv_heads: int,
               head_dim: int, dtype: torch.dtype, num_padded: int = 0, seed: int = 0,
               device: str = "cpu") -> Batch:
    """Sequences given as (query_len, seq_len), then `num_padded` CUDA-graph padding rows (query_len 1,
    seq_len 1, block table all null block). Blocks are a random permutation of 1..num_blocks-1;
    table entries past a sequence's blocks are the null block, as the model runner pads them."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-s // block_size) for _, s in specs]
    width = max(needed) + 2
    num_blocks = 1 + sum(needed) + 3  # + spare blocks nobody owns
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables = torch.zeros(len(specs) + num_padded, width, dtype=torch.int32)
    readable = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    readable[0, 0] = True  # padded rows read slot 0 of the null block
    for i, (n, s) in enumerate(specs):
        assert 1 <= n <= s
        own, perm = perm[:needed[i]], perm[needed[i]:]
        tables[i, :len(own)] = torch.tensor(own, dtype=torch.int32)
        for t in range(s):
            readable[own[t // block_size], t % block_size] = True
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    poisoned = cache.clone()
    poisoned[:, ~readable] = float("nan")
    query_lens = [n for n, _ in specs] + [1] * num_padded
    seq_lens = [s for _, s in specs] + [1] * num_padded
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=g).to(dtype)
    starts = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    to = dict(device=device)
    return Batch(q.to(**to), cache.to(**to), poisoned.to(**to), tables.to(**to), starts.to(**to),
                 torch.tensor(seq_lens, dtype=torch.int32, device=device), query_lens, seq_lens)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    assert not out.isnan().any(), "the kernel read a slot outside its sequences (NaN poisoned)"
    tol = TOLERANCE[dtype]
    err = (out.float().cpu() - ref.float().cpu()).abs().max().item()
    assert err < tol, f"max abs error {err:.3g} >= {tol}"


# (query_len, seq_len): a chunked prefill, a whole prompt spanning q blocks, decodes of long and
# length-1 sequences, a chunk whose start is not block aligned
MIXED = [(20, 83), (70, 70), (1, 150), (1, 1), (1, 33), (7, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_mixed_prefill_and_decode_batch(block_size, heads, dtype):
    batch = make_batch(MIXED, block_size, *heads, 64, dtype, num_padded=2, seed=block_size + heads[1])
    assert_close(batch.kernel(), batch.reference(), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_batch_with_padded_graph_rows(block_size, dtype):
    """T == B takes the decode tiles; the padding rows of a CUDA-graph size read the null block."""
    specs = [(1, s) for s in (200, 17, 64, 1, 95)]
    batch = make_batch(specs, block_size, 8, 2, 64, dtype, num_padded=3, seed=7)
    assert_close(batch.kernel(), batch.reference(), dtype)


@pytest.mark.parametrize("case", ["gqa3_hd40", "mqa_hd128_fp16", "gqa16"])
def test_odd_group_sizes_and_head_dims(case):
    """A non-power-of-two group (rows past BLOCK_Q * 3 masked), a padded head_dim, head_dim 128,
    a group larger than 16 query heads per KV head."""
    heads, head_dim, dtype = {"gqa3_hd40": ((6, 2), 40, torch.float32),
                              "mqa_hd128_fp16": ((4, 1), 128, torch.float16),
                              "gqa16": ((32, 1), 32, torch.float32)}[case]
    batch = make_batch([(9, 30), (1, 50), (3, 3)], 16, *heads, head_dim, dtype, num_padded=1, seed=3)
    assert_close(batch.kernel(), batch.reference(), dtype)


@pytest.mark.parametrize("spec", [(1, 40), (33, 33), (5, 77)], ids=["decode", "prefill", "chunk"])
def test_single_sequence(spec):
    """B == 1 (the JIT specializes an int argument equal to 1)."""
    batch = make_batch([spec], 16, 4, 2, 64, torch.float32, seed=spec[1])
    assert_close(batch.kernel(), batch.reference(), torch.float32)


def test_query_block_boundaries():
    """Every chunk length around the 64-row q block, against sequences of one block and many."""
    specs = [(n, n + c) for n in (1, 2, 15, 16, 17, 63, 64, 65) for c in (0, 5)]
    batch = make_batch(specs, 16, 2, 2, 32, torch.float32, seed=11)
    assert_close(batch.kernel(), batch.reference(), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kvcache_matches_reference(dtype):
    g = torch.Generator().manual_seed(5)
    cache = torch.randn(2, 9, 16, 3, 48, generator=g).to(dtype)
    slots = torch.randperm(9 * 16 - 16, generator=g)[:37] + 16  # distinct real slots
    k = torch.randn(40, 3, 48, generator=g).to(dtype)
    v = torch.randn(40, 3, 48, generator=g).to(dtype)
    k[37:], v[37:] = k[36], v[36]  # padded rows: identical k/v into slot 0 of the null block
    slots = torch.cat([slots, torch.zeros(3, dtype=torch.long)])
    ours, ref = cache.clone(), cache.clone()
    store_kvcache(k, v, ours, slots)
    store_kvcache_ref(k, v, ref, slots)
    assert torch.equal(ours, ref) and not torch.equal(ours, cache)
    store_kvcache(k[:0], v[:0], ours, slots[:0])  # no tokens: nothing to launch


def test_store_then_attend_equals_reference_step():
    """One model step: store the new tokens' keys/values, then attend (int32 slot mapping)."""
    specs = [(5, 21), (1, 40)]
    batch = make_batch(specs, 16, 4, 2, 32, torch.float32, seed=2)
    g = torch.Generator().manual_seed(9)
    k = torch.randn(6, 2, 32, generator=g)
    v = torch.randn(6, 2, 32, generator=g)
    bt = batch.block_tables
    slots = [int(bt[0, p // 16]) * 16 + p % 16 for p in range(16, 21)] + [int(bt[1, 39 // 16]) * 16 + 39 % 16]
    slot_mapping = torch.tensor(slots, dtype=torch.int32)
    ours, ref = batch.cache.clone(), batch.cache.clone()
    store_kvcache(k, v, ours, slot_mapping)
    store_kvcache_ref(k, v, ref, slot_mapping.long())
    out = batch.kernel(ours)
    expected = paged_attention_ref(batch.q, ref, bt, batch.query_lens, batch.seq_lens_list, 32 ** -0.5)
    assert_close(out, expected, torch.float32)


def test_bad_inputs_raise_clear_errors(monkeypatch):
    batch = make_batch([(2, 5)], 16, 2, 2, 16, torch.float32)
    args = (batch.q, batch.cache, batch.block_tables, batch.query_start_loc, batch.seq_lens, 0.25)
    with pytest.raises(ValueError, match="seq_lens must be"):
        paged_attention(*args[:4], batch.seq_lens.long(), 0.25)
    with pytest.raises(ValueError, match="query_start_loc must be"):
        paged_attention(*args[:3], batch.query_start_loc[:1], *args[4:])
    with pytest.raises(ValueError, match="one dtype"):
        paged_attention(batch.q.double(), *args[1:])
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_attention(batch.q[:, :1].expand(-1, 3, -1).contiguous(), *args[1:])
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kvcache(batch.q, batch.q, batch.cache, torch.zeros(1, dtype=torch.long))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        paged_attention(*args)


def _step(q, k, v, cache, slot_mapping, block_tables, query_start_loc, seq_lens):
    store_kvcache(k, v, cache, slot_mapping)
    return paged_attention(q, cache, block_tables, query_start_loc, seq_lens, 0.125).relu() * 2


def _step_inputs():
    batch = make_batch([(3, 12), (1, 20)], 16, 4, 2, 64, torch.float32, seed=4)
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(4, 2, 64, generator=g), torch.randn(4, 2, 64, generator=g)
    bt = batch.block_tables
    slots = torch.tensor([int(bt[0, 0]) * 16 + p for p in (9, 10, 11)] + [int(bt[1, 1]) * 16 + 3])
    return batch, (batch.q, k, v, batch.cache.clone(), slots, bt, batch.query_start_loc, batch.seq_lens)


def test_custom_ops_compile_without_graph_breaks():
    """fullgraph=True fails on any graph break; aot_eager runs the fake implementations and
    functionalization of the in-place store."""
    _, args = _step_inputs()
    eager_cache = args[3].clone()
    expected = _step(*args[:3], eager_cache, *args[4:])
    torch._dynamo.reset()
    out = torch.compile(_step, backend="aot_eager", fullgraph=True)(*args)
    assert torch.allclose(out, expected, atol=1e-6) and torch.equal(args[3], eager_cache)


@pytest.mark.slow
def test_custom_ops_under_inductor_store_in_place():
    """Inductor (C++ on the CPU, ~30 s to build) calls both ops and writes the cache in place."""
    from torch._inductor.utils import run_and_get_code

    _, args = _step_inputs()
    eager_cache = args[3].clone()
    expected = _step(*args[:3], eager_cache, *args[4:])
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(_step, backend="inductor", fullgraph=True), *args)
    assert torch.allclose(out, expected, atol=1e-6) and torch.equal(args[3], eager_cache)
    source = "\n".join(code)
    assert "elas_serve.store_kvcache" in source and "elas_serve.paged_attention" in source
    assert "copy_" not in source, "inductor copies the KV cache around the in-place store"


COMPILE_SCRIPT = r'''
import os, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from elas_serve.kernels.kv_cache_store import _store_kvcache_kernel
from elas_serve.kernels.paged_attention_triton import _paged_attention_kernel, launch_config

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_for(fn, arch, pointers, constexprs, num_warps):
    """As a launch with 16-aligned pointers and strides (what the JIT specializes on) compiles."""
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n.endswith("_ptr") or n.startswith("stride")}
    k = triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
    fields = dict(f.split(":") for f in next(l for l in usage.splitlines() if "REG:" in l).split()
                  if f.split(":")[0] in ("REG", "STACK", "LOCAL", "SHARED"))
    ptx = k.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "none"
    return fields, mma, k.metadata.shared


for arch in (90, 80):
    for qpk, head_dim, tokens, seqs in ((1, 64, 256, 256), (1, 64, 2048, 8), (4, 128, 256, 256),
                                        (4, 128, 2048, 8)):
        cfg = launch_config(tokens, seqs, qpk)
        fields, mma, shared = compile_for(
            _paged_attention_kernel, arch,
            {"q_ptr": "*bf16", "cache_ptr": "*bf16", "out_ptr": "*bf16", "block_tables_ptr": "*i32",
             "query_start_loc_ptr": "*i32", "seq_lens_ptr": "*i32", "scale_log2": "fp32"},
            {"QUERIES_PER_KV": qpk, "HEAD_DIM": head_dim, "HEAD_DIM_PAD": head_dim, "BLOCK_SIZE": 16,
             "BLOCK_Q": cfg["BLOCK_Q"], "BLOCK_M": cfg["BLOCK_M"], "TILE_N": cfg["TILE_N"], "UPCAST": False},
            cfg["num_warps"])
        kind = "decode" if tokens == seqs else "prefill"
        print(f"attention sm{arch} bf16 qpk={qpk} d={head_dim} {kind} BLOCK_M={cfg['BLOCK_M']} "
              f"TILE_N={cfg['TILE_N']}: regs={fields['REG']} stack={fields['STACK']} local={fields['LOCAL']} "
              f"shared={shared} mma={mma}")
    fields, _, shared = compile_for(_store_kvcache_kernel, arch, {"k_ptr": "*bf16", "v_ptr": "*bf16",
                                    "cache_ptr": "*bf16", "slot_mapping_ptr": "*i64"},
                                    {"HEAD_DIM": 128, "HEAD_DIM_PAD": 128}, 1)
    print(f"store sm{arch} bf16 d=128: regs={fields['REG']} stack={fields['STACK']} local={fields['LOCAL']} "
          f"shared={shared} mma=none")
print("triton", triton.__version__)
'''


def test_kernels_compile_for_sm90_and_sm80_with_mma_and_no_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # NOTE: a fresh cache, so every run really compiles
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("attention", "store"))]
    print("\n".join(lines))
    assert len(lines) == 10
    for line in lines:
        assert "stack=0 local=0" in line, f"spills: {line}"  # local memory holds spilled registers
        if line.startswith("attention"):
            assert ("mma=wgmma" in line or "mma=mma" in line), f"no tensor-core dot: {line}"
    # Hopper's warp-group MMA needs 64-row tiles: the prefill configuration gets it
    assert all("mma=wgmma" in line for line in lines if "sm90" in line and "prefill" in line)


GPU_SHAPES = {"350m": (16, 16, 64), "gqa8x128": (32, 8, 128), "demo": (4, 4, 64)}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_realistic_shapes(shape, dtype):
    heads, kv_heads, head_dim = GPU_SHAPES[shape]
    specs = [(512, 1024), (300, 300), (1, 2000), (64, 4000)] + [(1, s) for s in range(5, 2000, 97)]
    batch = make_batch(specs, 16, heads, kv_heads, head_dim, dtype, num_padded=4, device="cuda")
    assert_close(batch.kernel(), batch.reference(), dtype)


@pytest.mark.gpu
def test_gpu_decode_step_replays_in_a_cuda_graph():
    """Store + attention captured once, replayed after the lengths changed in place."""
    lens = [700, 33, 1200, 5]
    batch = make_batch([(1, s) for s in lens], 16, 16, 16, 64, torch.bfloat16, num_padded=4, device="cuda")
    k = torch.randn(8, 16, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    k[4:], v[4:] = k[4], v[4]  # padded rows: identical keys/values into the null block
    cache = batch.cache.clone()
    slots = torch.zeros(8, dtype=torch.long, device="cuda")
    out = torch.empty_like(batch.q)

    def step():
        store_kvcache(k, v, cache, slots)
        out.copy_(batch.kernel(cache))

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    new_lens = [690, 20, 1100, 3]  # within the blocks each sequence owns
    table = batch.block_tables.cpu()
    slots[:4] = torch.tensor([int(table[i, (s - 1) // 16]) * 16 + (s - 1) % 16 for i, s in enumerate(new_lens)])
    batch.seq_lens[:4] = torch.tensor(new_lens, dtype=torch.int32)
    batch.seq_lens_list[:4] = new_lens
    graph.replay()
    torch.cuda.synchronize()
    batch.cache = cache
    assert_close(out, batch.reference(), torch.bfloat16)
