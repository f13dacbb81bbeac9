"""The compiled decoder (engine/compilation.py): same tokens as eager, no recompilation for any
batch, eager serving while the background compile runs, and what --enforce-eager turns off."""

from __future__ import annotations

import random
import shutil
import time

import pytest
import torch
from torch._dynamo.utils import counters

from elas_serve.config import EngineConfig
from elas_serve.engine.core import EngineCore
from elas_serve.engine.messages import EngineCoreRequest
from elas_serve.sampling_params import SamplingParams

from authors_ckpt import Variant, write_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_file):
    path = tmp_path_factory.mktemp("compile_ckpt")
    write_checkpoint(path, Variant("compile", vocab=320, layers=2, extra_config={"eos_token_id": 0}))
    shutil.copy(tokenizer_file, path / "tokenizer.json")
    return path


def make_core(ckpt, enforce_eager: bool) -> EngineCore:
    return EngineCore.from_config(EngineConfig(model=ckpt, enforce_eager=enforce_eager, block_size=4,
                                               max_model_len=96, max_num_seqs=8, max_num_batched_tokens=48))


def generate(core: EngineCore, prompts: list[list[int]], tag: str, stagger: bool = True) -> list[list[int]]:
    """Greedy tokens; with `stagger`, requests join while others decode (mixed prefill/decode steps,
    chunked prefills, changing batch sizes)."""
    out: dict[str, list[int]] = {}
    pending = [EngineCoreRequest(f"{tag}{i}", p, GREEDY, GREEDY.max_tokens, [], time.monotonic())
               for i, p in enumerate(prompts)]
    while pending or core.has_unfinished_requests():
        for _ in range(1 if stagger else len(pending)):
            if pending:
                core.add_request(pending.pop(0))
        for o in core.step().outputs:
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [out[f"{tag}{i}"] for i in range(len(prompts))]


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 320) for _ in range(rng.randrange(1, 70))] for _ in range(n)]


@pytest.fixture(scope="module")
def compiled(ckpt):
    core = make_core(ckpt, enforce_eager=False)
    assert core.runner.decoder.wait(600), "the decoder did not compile"
    return core


def test_compiled_matches_eager_and_never_recompiles(ckpt, compiled):
    eager = make_core(ckpt, enforce_eager=True)
    assert eager.runner.decoder.compiled is None
    work = prompts(7, seed=0)
    frames = counters["frames"]["ok"]
    assert generate(compiled, work, "c") == generate(eager, work, "e")
    # every batch size and mix of prefill, chunked prefill and decode ran the two compiled graphs
    assert generate(compiled, prompts(5, seed=1), "c2", stagger=False) == generate(eager, prompts(5, seed=1), "e2",
                                                                                   stagger=False)
    assert counters["frames"]["ok"] == frames, "a new batch recompiled the decoder"


def test_steps_run_eagerly_while_the_background_compile_runs(ckpt, monkeypatch):
    import elas_serve.engine.compilation as compilation

    started = []
    real = compilation.Decoder._compile

    def slow_compile(self):
        started.append(time.monotonic())
        time.sleep(5.0)  # NOTE: serving must not wait for this
        real(self)

    monkeypatch.setattr(compilation.Decoder, "_compile", slow_compile)
    core = make_core(ckpt, enforce_eager=False)
    t0 = time.monotonic()
    tokens = generate(core, prompts(2, seed=2), "b")
    assert time.monotonic() - t0 < 5.0 and not core.runner.decoder.is_compiled
    assert all(len(t) == GREEDY.max_tokens for t in tokens)
    assert core.runner.decoder.wait(600)


def test_enforce_eager_from_the_environment(monkeypatch):
    monkeypatch.setenv("ELAS_SERVE_ENFORCE_EAGER", "0")
    assert EngineConfig().enforce_eager is False
    monkeypatch.setenv("ELAS_SERVE_ENFORCE_EAGER", "1")
    assert EngineConfig().enforce_eager is True
    assert EngineConfig(enforce_eager=False).enforce_eager is False

    from elas_serve.cli import build_parser
    args = build_parser().parse_args(["serve"])
    assert args.enforce_eager is True
    monkeypatch.delenv("ELAS_SERVE_ENFORCE_EAGER")
    assert build_parser().parse_args(["serve"]).enforce_eager is False
    assert build_parser().parse_args(["serve", "--enforce-eager"]).enforce_eager is True


def _rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_cpu_kv_cache_costs_no_memory_until_written(ckpt):
    before = _rss_bytes()
    core = EngineCore.from_config(EngineConfig(model=ckpt, enforce_eager=True, kv_cache_memory=512 << 20))
    caches = core.runner.kv_caches
    assert sum(c.numel() * c.element_size() for c in caches) > 500 << 20
    assert _rss_bytes() - before < 64 << 20  # NOTE: torch.zeros would have made all 512 MiB resident
    assert all(torch.count_nonzero(c[:, :4]) == 0 for c in caches)  # reads as zeros


def test_runner_metadata_drives_the_triton_kernels_as_the_reference(ckpt):
    """What CUDA runs inside the attention op (Triton store + paged attention, here under the
    interpreter) equals the CPU reference on the runner's own metadata of a mixed step: chunked
    prefills, decodes, several blocks per sequence."""
    from elas_serve.kernels.kv_cache_store import store_kvcache
    from elas_serve.kernels.paged_attention import paged_attention_ref, store_kvcache_ref
    from elas_serve.kernels.paged_attention_triton import paged_attention

    core = make_core(ckpt, enforce_eager=True)
    for i, p in enumerate(prompts(4, seed=3)):
        core.add_request(EngineCoreRequest(f"m{i}", p, GREEDY, GREEDY.max_tokens, [], time.monotonic()))
    core.step()
    core.add_request(EngineCoreRequest("late", prompts(1, seed=4)[0] * 2, GREEDY, GREEDY.max_tokens, [], time.monotonic()))
    sched = core.scheduler.schedule()
    assert {n for _, n in sched.scheduled} - {1}, "a prefill chunk in the step"
    _, _, meta = core.runner.prepare_inputs(sched)
    cfg = core.model.config
    g = torch.Generator().manual_seed(0)
    num_tokens = meta.slot_mapping.shape[0]
    q = torch.randn(num_tokens, cfg.num_attention_heads, cfg.head_dim, generator=g)
    k, v = (torch.randn(num_tokens, cfg.num_key_value_heads, cfg.head_dim, generator=g) for _ in range(2))
    cache = torch.randn(core.runner.kv_caches[0].shape, generator=g)
    ref_cache = cache.clone()
    store_kvcache(k, v, cache, meta.slot_mapping)
    store_kvcache_ref(k, v, ref_cache, meta.slot_mapping)
    assert torch.equal(cache, ref_cache)
    scale = cfg.head_dim ** -0.5
    got = paged_attention(q, cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale)
    want = paged_attention_ref(q, ref_cache, meta.block_tables, meta.query_lens_cpu, meta.seq_lens_cpu, scale)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
