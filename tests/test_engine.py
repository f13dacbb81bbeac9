"""The engine end to end on a tiny random checkpoint: batching changes nothing, stops and
log-probs mean what they say, aborts return every block.

Run: python -m pytest tests/test_engine.py -v
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
from dataclasses import dataclass

import pytest
import torch

from elas_serve import LLM, SamplingParams
from elas_serve.config import EngineConfig
from elas_serve.engine.core import MAX_CONSECUTIVE_FAILED_STEPS, EngineCore
from elas_serve.frontend import AsyncLLM, EngineDeadError, RequestFailedError
from elas_serve.frontend.output_processor import OutputProcessor
from elas_serve.frontend.processor import InputProcessor
from elas_serve.models import load_model
from elas_serve.sampling_params import InvalidRequestError
from elas_serve.tokenizer import Tokenizer

from authors_ckpt import Variant, write_checkpoint

VOCAB = 320


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_file):
    path = tmp_path_factory.mktemp("engine_ckpt")
    write_checkpoint(path, Variant("engine", vocab=VOCAB, layers=2, extra_config={"eos_token_id": 0}))
    shutil.copy(tokenizer_file, path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt)


@dataclass
class Delta:
    """One step's output of one request (n == 1), flattened from the front end's RequestOutput."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finish_reason: str | None
    stop_reason: str | int | None
    prompt_logprobs: list | None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """The offline path piece by piece, stepped by hand: the front end's processors around an
    `EngineCore` (what `LLM` does), so tests can look at the core's requests and blocks."""

    def __init__(self, core: EngineCore, tokenizer: Tokenizer):
        self.core, self.runner, self.scheduler = core, core.runner, core.scheduler
        self.block_manager = core.scheduler.block_manager
        self.processor = InputProcessor(tokenizer, core.model_info)
        self.output_processor = OutputProcessor(tokenizer)
        self.logprobs: dict[str, list] = {}
        self.prefix_hit_tokens = 0
        self._ids = itertools.count()

    def add_request(self, request_id, prompt, params: SamplingParams):
        request_id = request_id or f"r{next(self._ids)}"
        prepared = self.processor.prepare([prompt], params)[0]
        self.output_processor.add(request_id, prepared, params, time.monotonic())
        (req,) = self.processor.make_requests(prepared, params, request_id, time.monotonic())
        self.core.add_request(req)
        request = self.scheduler.requests[req.request_id]
        request.logprobs = self.logprobs.setdefault(request_id, [])
        return request

    def step(self) -> list[Delta]:
        outs = self.core.step()
        self.prefix_hit_tokens += outs.stats.num_prefix_hit_tokens
        result = self.output_processor.process(outs)
        if result.to_abort:
            self.core.abort_requests(result.to_abort)
        deltas = []
        for parent, out in result.outputs:
            c = out.outputs[0]
            self.logprobs[parent.request_id] += c.logprobs or []
            deltas.append(Delta(f"{parent.request_id}-0", c.token_ids, c.text, c.finish_reason, c.stop_reason,
                                out.prompt_logprobs))
        return deltas

    def abort_request(self, request_id: str) -> Delta:
        (out,) = self.core.abort_requests([request_id]).outputs
        return Delta(out.request_id, [], "", out.finish_reason, out.stop_reason, None)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()


def make_engine(ckpt, model, **kw) -> Engine:
    config = EngineConfig(model=ckpt, **kw)
    core = EngineCore(model, config)
    return Engine(core, Tokenizer.from_path(ckpt, core.model_info.eos_token_ids))


def run(engine: Engine, prompts, params) -> dict[str, list[int]]:
    ids = [engine.add_request(None, p, params if isinstance(params, SamplingParams) else params[i]).request_id
           for i, p in enumerate(prompts)]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[i] for i in ids]


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        logits = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids))))
        ids.append(int(logits[-1].argmax()))
    return ids[len(prompt):]


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_batched_greedy_equals_one_at_a_time_with_chunking_and_preemption(ckpt, model):
    prompts = prompts_of([3, 17, 40, 9, 25, 1])
    expected = [greedy_reference(model, p, 12) for p in prompts]
    # budget 16 forces chunked prefill; 13 blocks of 4 tokens cannot hold 6 sequences of up to 52 tokens
    engine = make_engine(ckpt, model, max_num_batched_tokens=16, block_size=4, num_kv_blocks=13,
                         max_model_len=52)
    assert run(engine, prompts, GREEDY) == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks


def test_prefix_cache_hits_change_nothing(ckpt, model):
    base = prompts_of([37])[0]
    prompts = [base + tail for tail in prompts_of([5, 1, 9], seed=1)] + [base]
    cold = run(make_engine(ckpt, model, enable_prefix_caching=False, block_size=4), prompts, GREEDY)
    engine = make_engine(ckpt, model, block_size=4, max_num_seqs=1)  # one at a time: later ones hit
    assert run(engine, prompts, GREEDY) == cold
    assert engine.prefix_hit_tokens >= 3 * 36


def test_seeded_sampling_is_batch_independent(ckpt, model):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    prompt = prompts_of([7])[0]
    alone = run(make_engine(ckpt, model), [prompt], params)[0]
    others = prompts_of([3, 30, 11], seed=5)
    mixed = [params] + [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)] * 3
    crowd = run(make_engine(ckpt, model, max_num_batched_tokens=8, seed=99), [prompt] + others, mixed)[0]
    assert alone == crowd
    other_seed = run(make_engine(ckpt, model), [prompt], SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, seed=4321, max_tokens=16, ignore_eos=True))[0]
    assert other_seed != alone


def test_sampling_filters_that_leave_one_token_are_greedy(ckpt, model):
    prompt = prompts_of([6])[0]
    greedy = run(make_engine(ckpt, model), [prompt], GREEDY)[0]
    for kw in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        params = SamplingParams(temperature=1.5, max_tokens=12, ignore_eos=True, **kw)
        assert run(make_engine(ckpt, model), [prompt], params)[0] == greedy, kw


def test_aborts_return_every_block(ckpt, model):
    engine = make_engine(ckpt, model, max_num_seqs=2, block_size=4)
    reqs = [engine.add_request(None, p, GREEDY) for p in prompts_of([20, 5, 9, 30])]
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_usable_blocks
    for req in reqs:  # two running, two waiting
        out = engine.abort_request(req.request_id)
        assert out.finished and out.finish_reason == "abort" and out.request_id == req.request_id
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
    assert engine.block_manager.usage == 0.0
    assert all(r.status.finish_reason == "abort" for r in reqs)


def _stream(engine, prompt, params):
    req = engine.add_request(None, prompt, params)
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.new_text)
            final = out
    return req, deltas, final


def test_stop_string_is_cut_and_never_streamed(ckpt, model):
    engine = make_engine(ckpt, model)
    prompt = "It is a truth universally"
    _, deltas, _ = _stream(engine, prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    text = "".join(deltas)
    # a 3-character window that first occurs where it is, past the first few characters
    at = next(i for i in range(4, len(text) - 3) if text.find(text[i:i + 3]) == i
              and "\ufffd" not in text[i - 1:i + 4])
    stop = text[at:at + 3]
    req, deltas, final = _stream(engine, prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                                stop=["\x00never", stop]))
    assert "".join(deltas) == text[:at]
    assert all(stop not in d for d in deltas)
    assert final.finish_reason == "stop" and final.stop_reason == stop


def test_stop_token_ids_min_tokens_eos(ckpt, model):
    prompt = prompts_of([5])[0]
    greedy = run(make_engine(ckpt, model), [prompt], GREEDY)[0]
    stop_id = greedy[3]
    first = greedy.index(stop_id)
    engine = make_engine(ckpt, model)
    req, _, final = _stream(engine, prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                           stop_token_ids=[stop_id]))
    assert req.output_token_ids == greedy[:first + 1]
    assert final.finish_reason == "stop" and final.stop_reason == stop_id
    # EOS forced by logit_bias: it is held off until min_tokens, then stops the request
    forced = SamplingParams(temperature=0, max_tokens=12, logit_bias={0: 100.0}, min_tokens=4)
    req, _, final = _stream(engine, prompt, forced)
    assert req.output_token_ids[-1] == 0 and len(req.output_token_ids) == 5 and 0 not in req.output_token_ids[:4]
    assert final.finish_reason == "stop" and final.stop_reason is None
    ignore = SamplingParams(temperature=0, max_tokens=6, logit_bias={0: 100.0}, ignore_eos=True)
    req, _, final = _stream(engine, prompt, ignore)
    assert req.output_token_ids == [0] * 6 and final.finish_reason == "length"


def test_max_model_len_limits(ckpt, model):
    engine = make_engine(ckpt, model, max_model_len=20)
    req, _, final = _stream(engine, prompts_of([15])[0], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    assert req.max_tokens == 5 and len(req.output_token_ids) == 5 and final.finish_reason == "length"
    with pytest.raises(InvalidRequestError, match="maximum context length is 20 tokens.*contains 21 input tokens"):
        engine.add_request(None, prompts_of([21])[0], GREEDY)
    with pytest.raises(InvalidRequestError, match="contains 20 input tokens"):
        engine.add_request(None, prompts_of([20])[0], GREEDY)
    engine.add_request(None, prompts_of([20])[0], SamplingParams(max_tokens=0, prompt_logprobs=0))
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.add_request(None, [1, VOCAB], GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request(None, "", GREEDY)


def test_logprobs_match_the_model(ckpt, model):
    prompt = prompts_of([9])[0]
    engine = make_engine(ckpt, model, max_num_batched_tokens=4)  # prompt logprobs across chunks
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=5, prompt_logprobs=2)
    req, _, final = _stream(engine, prompt, params)
    ids = prompt + req.output_token_ids
    ref = torch.log_softmax(model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)))), -1)
    assert req.prompt_logprobs[0] is None and len(req.prompt_logprobs) == len(prompt)
    for i, lp in enumerate(req.prompt_logprobs[1:], start=1):
        assert lp.token_id == prompt[i]
        assert lp.logprob == pytest.approx(ref[i - 1, prompt[i]].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == ref[i - 1].topk(2).indices.tolist()
    for j, lp in enumerate(req.logprobs):
        row = ref[len(prompt) - 1 + j]
        assert lp.token_id == req.output_token_ids[j] and lp.rank == 1
        assert lp.logprob == pytest.approx(row.max().item(), abs=1e-4)
        assert len(lp.top) == 5 and lp.top[0][0] == lp.token_id


def test_prompt_only_scoring_with_max_tokens_zero(ckpt, model):
    engine = make_engine(ckpt, model)
    req, deltas, final = _stream(engine, prompts_of([6])[0], SamplingParams(max_tokens=0, prompt_logprobs=1))
    assert req.output_token_ids == [] and final.finished and final.finish_reason == "length"
    assert len(final.prompt_logprobs) == 6 and final.prompt_logprobs[0] is None


def test_llm_generate_n_and_order(ckpt):
    llm = LLM(model=ckpt, max_num_batched_tokens=64)
    prompts = ["It is a truth", "a single man"]
    res = llm.generate(prompts, SamplingParams(temperature=1.0, n=3, seed=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)
    assert [r.prompt for r in res] == prompts
    assert [len(r.outputs) for r in res] == [3, 3] and [c.index for c in res[0].outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in res[0].outputs}) > 1  # distinct seeds per sample
    again = llm.generate(prompts, SamplingParams(temperature=1.0, n=3, seed=0, max_tokens=8, ignore_eos=True),
                         use_tqdm=False)
    assert [[c.text for c in r.outputs] for r in again] == [[c.text for c in r.outputs] for r in res]


def test_async_engine_streams_and_aborts(ckpt, model):
    engine = make_engine(ckpt, model, block_size=4)
    expected = run(make_engine(ckpt, model), prompts_of([8, 13]), GREEDY)

    async def main():
        llm = AsyncLLM(engine.core.config, core=engine.core)
        try:
            async def collect(prompt):
                return [t async for out in llm.generate(prompt, GREEDY) for t in out.outputs[0].token_ids]
            got = await asyncio.gather(*(collect(p) for p in prompts_of([8, 13])))
            assert got == expected
            # leaving a stream early aborts the request and frees its blocks
            stream = llm.generate(prompts_of([30])[0], SamplingParams(max_tokens=1000, ignore_eos=True))
            await stream.__anext__()
            await stream.aclose()
            for _ in range(100):
                await asyncio.sleep(0.01)
                if llm.num_unfinished == 0 and engine.block_manager.usage == 0:
                    break
            assert llm.num_unfinished == 0 and engine.block_manager.usage == 0
            with pytest.raises(InvalidRequestError):
                [o async for o in llm.generate("", GREEDY)]
        finally:
            llm.shutdown()
    asyncio.run(main())


def test_a_failed_step_fails_its_requests_and_repeated_failures_kill_the_engine(ckpt, model):
    engine = make_engine(ckpt, model)
    execute, failing = engine.runner.execute, [True]

    def flaky(*args, **kwargs):
        if failing[0]:
            raise RuntimeError("boom")
        return execute(*args, **kwargs)
    engine.runner.execute = flaky

    async def main():
        llm = AsyncLLM(engine.core.config, core=engine.core)
        with pytest.raises(RequestFailedError, match="boom"):
            [o async for o in llm.generate("hello", GREEDY)]
        assert llm.dead_error is None and engine.block_manager.usage == 0 and not engine.scheduler.requests
        failing[0] = False
        assert [o async for o in llm.generate("hello", GREEDY)][-1].finished  # it carries on
        failing[0] = True
        for _ in range(MAX_CONSECUTIVE_FAILED_STEPS - 1):
            with pytest.raises(RequestFailedError):
                [o async for o in llm.generate("hello", GREEDY)]
            assert llm.dead_error is None
        with pytest.raises((RequestFailedError, EngineDeadError)):
            [o async for o in llm.generate("hello", GREEDY)]
        for _ in range(100):
            if llm.dead_error is not None:
                break
            await asyncio.sleep(0.01)
        assert llm.dead_error is not None and "3 engine steps failed in a row" in str(llm.dead_error)
        with pytest.raises(EngineDeadError):
            [o async for o in llm.generate("hello", GREEDY)]
    asyncio.run(main())


def test_graph_decode_path_equals_eager(ckpt, model):
    """The CUDA-graph decode path (static padded buffers and metadata, null-block padding, stale
    block-table columns past each sequence's blocks), run without capture on CPU, changes no token."""
    from elas_serve.engine.cuda_graph import CUDAGraphRunner

    prompts = prompts_of([3, 17, 9, 25, 6])
    eager = run(make_engine(ckpt, model, block_size=4, max_model_len=64), prompts, GREEDY)
    engine = make_engine(ckpt, model, block_size=4, max_model_len=64, max_num_seqs=8)
    runner = engine.runner
    runner.graphs = CUDAGraphRunner(runner.decoder, model.config.hidden_size, runner.dtype, 8,
                                    runner.max_blocks_per_seq, capture=False)
    assert runner.graphs.sizes == [1, 2, 4, 8]
    calls = []
    graph_run = runner.graphs.run
    runner.graphs.run = lambda ids, *a: calls.append(len(ids)) or graph_run(ids, *a)
    assert run(engine, prompts, GREEDY) == eager
    assert calls and set(calls) >= {5}  # decode steps went through the padded path (5 -> 8)
