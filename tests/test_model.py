"""The loaded model computes what the authors' checkpoints mean: logits against an independent
float64 implementation for every checkpoint variant, and paged KV-cached decoding against a full
forward pass.

Run: python -m pytest tests/test_model.py -v
"""

from __future__ import annotations

import json
import zlib

import pytest
import torch

from elas_serve.models import AttentionMetadata, load_model

from authors_ckpt import Variant, make_config, reference_logits, write_checkpoint

VARIANTS = [
    Variant("loro_all"),
    Variant("dense_attn_loro_mlp", attn_rank=None, mlp_rank=32),
    Variant("loro_attn_dense_mlp", attn_rank=8, mlp_rank=None),
    Variant("relu2_no_2by4", two_by_four=False),
    Variant("swiglu_lowrank", squ_relu="silu", two_by_four=False),
    Variant("llama_dense", squ_relu=None, attn_rank=None, mlp_rank=None, kv_heads=4),
    Variant("width_mult_of_4", intermediate=64),  # relu2 width 96
    Variant("mha_no_gqa", kv_heads=4),
    Variant("tied_embeddings", tied=True),
    Variant("biases_rope_theta", bias=True, rope_theta=500000.0),
    Variant("sharded", fmt="sharded"),
    Variant("pytorch_bin", fmt="bin"),
    Variant("stored_bf16", dtype=torch.bfloat16),
    Variant("bin_bf16_dense_attn", fmt="bin", dtype=torch.bfloat16, attn_rank=None),
    Variant("sharded_bin", fmt="sharded_bin"),
]

# worst |logit - reference| seen per (variant, load dtype); printed at the end of the session
ERRORS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report_errors():
    yield
    if ERRORS:
        worst = max(ERRORS, key=ERRORS.get)
        print(f"\nmax |logit error| over {len(ERRORS)} cases: {ERRORS[worst]:.3g} ({worst})")
        for k, e in sorted(ERRORS.items()):
            print(f"  {k:40s} {e:.3g}")


@pytest.mark.parametrize("load_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_logits_match_float64_reference(tmp_path, variant, load_dtype):
    sd = write_checkpoint(tmp_path, variant, seed=zlib.crc32(variant.name.encode()) % 1000)  # stable seed
    model = load_model(tmp_path, dtype=load_dtype)
    assert all(p.dtype == load_dtype for p in model.parameters())
    ids = torch.randint(0, variant.vocab, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    # the reference sees the weights as loaded (rounded to the load dtype), in float64
    sd_loaded = {k: t.to(load_dtype) for k, t in sd.items()}
    ref = reference_logits(sd_loaded, make_config(variant), ids)
    got = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)))).double()
    err = (got - ref).abs().max().item()
    rel = ((got - ref).norm() / ref.norm()).item()
    ERRORS[f"{variant.name}/{str(load_dtype)[6:]}"] = err
    if load_dtype == torch.float32:
        assert rel <= 1e-5 and err <= 1e-4 * ref.abs().max().item(), (err, rel)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
        model.prepare_for_serving()  # fused q/k/v GEMMs, column-major output weight: the same logits
        fused = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)))).double()
        assert model.model.layers[0].self_attn.qkv_weight is not None
        assert ((fused - got).norm() / got.norm()).item() <= 1e-6
    else:
        # NOTE: 2:4 selection is discontinuous: where two activations of a group tie to bf16
        # precision, bf16 keeps a different feature than float64 does, and that feature's whole
        # down-projection row changes the output. Hence the wider bound with 2:4.
        sparse = variant.squ_relu == "relu2" and variant.two_by_four
        assert rel <= (8e-2 if sparse else 2e-2), (err, rel)


def test_projection_layouts_read_from_shapes(tmp_path):
    v = Variant("mixed", attn_rank=None, mlp_rank=24)
    write_checkpoint(tmp_path, v)
    model = load_model(tmp_path)
    specs = model.projection_specs()
    assert specs["model.layers.0.self_attn.q_proj"].rank is None
    assert specs["model.layers.1.mlp.down_proj"].rank == 24
    assert model.model.layers[0].mlp.up_proj.out_features == 129
    assert model.lm_head is not None


def _paged_metadata(query_lens, seq_lens, tables, block_size):
    slots = []
    for q, s, table in zip(query_lens, seq_lens, tables):
        for pos in range(s - q, s):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return AttentionMetadata.from_lens(torch.tensor(slots), bt, list(query_lens), list(seq_lens))


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_kv_cache_decoding_equals_full_forward(tmp_path, block_size):
    """Three sequences of different lengths share each step: chunked prefills mixed with decodes,
    blocks scattered over the cache in shuffled order."""
    v = Variant("kv", layers=3)
    write_checkpoint(tmp_path, v)
    model = load_model(tmp_path)
    g = torch.Generator().manual_seed(0)
    lens = [19, 7, 30]
    seqs = [torch.randint(0, v.vocab, (n,), generator=g) for n in lens]
    full = [model.compute_logits(model(s, torch.arange(len(s)))) for s in seqs]

    num_blocks = sum((n + block_size - 1) // block_size for n in lens) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, k = [], 0
    for n in lens:
        nb = (n + block_size - 1) // block_size
        tables.append(perm[k:k + nb])
        k += nb
    cfg = model.config
    # large finite garbage everywhere: attending to a slot never written would show in the logits
    kv_caches = [100 * torch.randn(2, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim,
                                   generator=g) for _ in range(cfg.num_hidden_layers)]
    done = [0, 0, 0]
    chunk = [5, 3, 11]  # prefill chunk per step, then 1 token per step
    while any(d < n for d, n in zip(done, lens)):
        active = [i for i in range(3) if done[i] < lens[i]]
        q_lens = [min(chunk[i] if done[i] < 12 else 1, lens[i] - done[i]) for i in active]
        s_lens = [done[i] + q for i, q in zip(active, q_lens)]
        ids = torch.cat([seqs[i][done[i]:done[i] + q] for i, q in zip(active, q_lens)])
        pos = torch.cat([torch.arange(done[i], done[i] + q) for i, q in zip(active, q_lens)])
        meta = _paged_metadata(q_lens, s_lens, [tables[i] for i in active], block_size)
        logits = model.compute_logits(model(ids, pos, meta, kv_caches))
        row = 0
        for i, q in zip(active, q_lens):
            torch.testing.assert_close(logits[row:row + q], full[i][done[i]:done[i] + q],
                                       rtol=1e-4, atol=1e-4)
            row += q
            done[i] += q


def test_config_json_fields_as_authors_write_them(tmp_path):
    v = Variant("cfg")
    write_checkpoint(tmp_path, v)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["intermediate_size"] == 86 and raw["squ_relu"] == "relu2"
    model = load_model(tmp_path)
    assert model.config.ffn_width == 129 and model.config.max_position_embeddings == 2048
    assert model.config.eos_token_ids == [1]
