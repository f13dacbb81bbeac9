"""LLM: offline batched generation, `LLM(model=...).generate(prompts, SamplingParams(...))`.

All prompts (and their `n` samples) go into the engine at once and are served by continuous
batching; results come back in prompt order, with the `n` completions of a prompt in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from elas_serve.config import EngineConfig
from elas_serve.engine.llm_engine import LLMEngine
from elas_serve.engine.request import TokenLogprob
from elas_serve.sampling_params import SamplingParams
from elas_serve.utils import DEMO_CHECKPOINT


@dataclass(slots=True)
class Completion:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass(slots=True)
class CompletionResult:
    prompt: str | list[int]
    prompt_token_ids: list[int]
    outputs: list[Completion]
    prompt_logprobs: list[TokenLogprob | None] | None = None


class LLM:
    def __init__(self, model: str | Path = DEMO_CHECKPOINT, **kwargs: Any):
        self.engine = LLMEngine.from_config(EngineConfig.from_kwargs(model=model, **kwargs))

    def generate(self, prompts: str | list[str] | list[int] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[CompletionResult]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        results, slots = [], {}
        for prompt, p in zip(prompts, params):
            result = CompletionResult(prompt, [], [])
            for i in range(p.n):
                req = self.engine.add_request(None, prompt, p.child(i))
                result.prompt_token_ids = req.prompt_token_ids
                result.outputs.append(Completion(i, logprobs=[] if p.logprobs is not None else None))
                slots[req.request_id] = (result, result.outputs[-1])
            results.append(result)
        with tqdm(total=len(slots), desc="generate", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    result, completion = slots[out.request_id]
                    completion.text += out.new_text
                    completion.token_ids += out.new_token_ids
                    if completion.logprobs is not None and out.new_logprobs:
                        completion.logprobs += out.new_logprobs
                    if out.prompt_logprobs is not None:
                        result.prompt_logprobs = out.prompt_logprobs
                    if out.finished:
                        completion.finish_reason, completion.stop_reason = out.finish_reason, out.stop_reason
                        bar.update(1)
        return results
