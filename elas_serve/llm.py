"""LLM: offline batched generation, `LLM(model=...).generate(prompts, SamplingParams(...))`.

The engine core runs in this process, stepped synchronously; prompts go through the same input
and output processing as the server's (`elas_serve.frontend`). All prompts (and their `n`
completions) go into the engine at once and are served by continuous batching; results come back
in prompt order, each `RequestOutput` with its `n` completions in order. `iter_outputs` yields
the stream deltas as they come (what `elas-serve generate` prints).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from elas_serve.config import EngineConfig
from elas_serve.engine.core import EngineCore
from elas_serve.frontend.output_processor import OutputProcessor
from elas_serve.frontend.processor import InputProcessor
from elas_serve.outputs import CompletionOutput, RequestOutput
from elas_serve.sampling_params import SamplingParams
from elas_serve.tokenizer import Tokenizer
from elas_serve.utils import DEMO_CHECKPOINT

log = logging.getLogger("elas_serve.llm")


class LLM:
    def __init__(self, model: str | Path = DEMO_CHECKPOINT, **kwargs: Any):
        config = EngineConfig.from_kwargs(model=model, **kwargs)
        self.core = EngineCore.from_config(config)
        self.tokenizer = Tokenizer.from_path(config.tokenizer or config.model, self.core.model_info.eos_token_ids)
        self.processor = InputProcessor(self.tokenizer, self.core.model_info)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._num_requests = 0

    def iter_outputs(self, prompts: list[str | list[int]], params: list[SamplingParams]
                     ) -> Iterator[tuple[int, RequestOutput]]:
        """(prompt index, stream delta) until every prompt has finished."""
        ids = {}
        arrival = time.monotonic()
        prepared = [self.processor.prepare([prompt], p)[0] for prompt, p in zip(prompts, params)]
        for i, (prompt, p) in enumerate(zip(prepared, params)):
            request_id = f"offline-{self._num_requests}"
            self._num_requests += 1
            ids[request_id] = i
            self.output_processor.add(request_id, prompt, p, arrival)
            for req in self.processor.make_requests(prompt, p, request_id, arrival):
                self.core.add_request(req)
        while self.core.has_unfinished_requests():
            result = self.output_processor.process(self.core.step())
            if result.to_abort:
                self.core.abort_requests(result.to_abort)  # stop strings; their outputs are not needed
            for parent in result.failed:
                log.warning("request %s failed: %s", parent.request_id, parent.error)
                yield ids[parent.request_id], RequestOutput(
                    parent.request_id, parent.prompt.prompt, parent.prompt.prompt_token_ids,
                    [CompletionOutput(c.index, finish_reason="error") for c in parent.children], finished=True)
            for parent, out in result.outputs:
                yield ids[parent.request_id], out

    def generate(self, prompts: str | list[str] | list[int] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        results: list[RequestOutput | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc="generate", disable=not use_tqdm) as bar:
            for i, delta in self.iter_outputs(prompts, params):
                if results[i] is None:
                    results[i] = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids,
                                               [CompletionOutput(j) for j in range(params[i].n)])
                result = results[i]
                for c in delta.outputs:
                    if params[i].logprobs is not None and result.outputs[c.index].logprobs is None:
                        result.outputs[c.index].logprobs = []
                    result.outputs[c.index].add(c)
                result.prompt_logprobs = delta.prompt_logprobs or result.prompt_logprobs
                result.num_cached_tokens = delta.num_cached_tokens
                if delta.finished:
                    result.finished = True
                    bar.update(1)
        return results  # type: ignore[return-value]
