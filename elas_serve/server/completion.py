"""POST /v1/completions: OpenAI's text completions, vLLM's extensions, streaming over SSE.

Choices are flattened across prompts and `n` (index = prompt * n + sample). With `echo`, the
prompt comes first in `text` and, with `logprobs`, in the log-probs too, whose first entry is
null (nothing scores the first token): what lm-evaluation-harness's loglikelihood relies on.
Usage counts each prompt once and every generated token.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from elas_serve.outputs import RequestOutput, TokenLogprob
from elas_serve.sampling_params import InvalidRequestError, SamplingParams

from .protocol import Bool, Int, PromptLogprob, SamplingFields, Str, TokenId, Usage, error_body, ranged
from .serving import (
    OpenAIServing,
    SSEResponse,
    clamp,
    client_gone,
    collect,
    merged_stream,
    prompt_logprobs_json,
    sse,
    token_str,
    usage,
)


class CompletionRequest(SamplingFields):
    prompt: Str | list[Str] | list[TokenId] | list[list[TokenId]]
    max_tokens: ranged("max_tokens", Int) | None = 16
    echo: Bool = False
    logprobs: ranged("logprobs", Int) | None = None
    suffix: Str | None = None
    return_tokens_as_token_ids: Bool = False

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", "suffix")
        return prompts  # type: ignore[return-value]

    def to_sampling_params(self) -> SamplingParams:
        max_tokens = 16 if self.max_tokens is None else self.max_tokens
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self.sampling_params(max_tokens, self.logprobs, prompt_logprobs)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length", "abort"] | None
    stop_reason: str | int | None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None  # with `prompt_logprobs`


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, body: CompletionRequest, http: HTTPRequest):
        self.check_model(body.model)
        prompts = body.prompts()
        params = body.to_sampling_params()
        prepared = await self.prepare(prompts, params)
        streams = self.submit(prepared, params)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}
        render = _Renderer(self, body, prompts, params.n)
        if body.stream:
            num_prompt_tokens = sum(len(p.prompt_token_ids) for p in prepared)
            return SSEResponse(self._stream(body, streams, head, render, num_prompt_tokens), streams)
        results = await collect(http, streams)
        if results is None:
            return client_gone()
        # NOTE: rendering (detokenizing log-prob tokens, JSON) grows with the response: off the loop
        return await asyncio.to_thread(self._response, render, head, results, params.n)

    def _response(self, render: "_Renderer", head: dict, results: list[RequestOutput], n: int) -> JSONResponse:
        choices = []
        for p, result in enumerate(results):
            for c in result.outputs:
                i = p * n + c.index
                text, lp = render.piece(i, p, result, c.text, c.token_ids, c.logprobs or [], first=True)
                choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                          "stop_reason": c.stop_reason}
                if render.body.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = prompt_logprobs_json(self.tokenizer, result.prompt_logprobs)
                choices.append(choice)
        return JSONResponse({**head, "choices": choices, "usage": usage(
            sum(len(r.prompt_token_ids) for r in results), sum(len(c.token_ids) for r in results for c in r.outputs),
            sum(r.num_cached_tokens for r in results))})

    async def _stream(self, body: CompletionRequest, streams: list, head: dict, render: "_Renderer",
                      num_prompt_tokens: int) -> AsyncIterator[str]:
        opts = body.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        n = render.n
        started = [False] * (len(streams) * n)
        generated = 0
        cached: dict[int, int] = {}
        try:
            async for p, out in merged_stream(streams):
                cached[p] = out.num_cached_tokens
                for c in out.outputs:
                    i = p * n + c.index
                    first, started[i] = not started[i], True
                    generated += len(c.token_ids)
                    if not (first and body.echo) and not c.token_ids and not c.text and not c.finished:
                        continue
                    text, lp = render.piece(i, p, out, c.text, c.token_ids, c.logprobs or [], first)
                    choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                              "stop_reason": c.stop_reason}
                    if first and body.prompt_logprobs is not None:
                        choice["prompt_logprobs"] = prompt_logprobs_json(self.tokenizer, out.prompt_logprobs)
                    chunk = {**head, "choices": [choice]}
                    if include_usage:
                        chunk["usage"] = usage(num_prompt_tokens, generated, sum(cached.values())) if continuous else None
                    yield sse(chunk)
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(num_prompt_tokens, generated, sum(cached.values()))})
        except Exception as e:  # noqa: BLE001 (reported in-band: the status line is already sent)
            yield sse(error_body(500, f"the request failed while streaming: {e}"))
        yield sse("[DONE]")


class _Renderer:
    """Text and log-probs of one completion request's choices, whole or as stream deltas."""

    def __init__(self, serving: OpenAIServing, body: CompletionRequest, prompts: list, n: int):
        self.tokenizer, self.body, self.prompts, self.n = serving.tokenizer, body, prompts, n
        self.offsets = [0] * (len(prompts) * n)  # text_offset reached per choice (streaming)

    def prompt_text(self, p: int) -> str:
        prompt = self.prompts[p]
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(list(prompt))

    def piece(self, index: int, p: int, out: RequestOutput, text: str, token_ids: list[int],
              logprobs: list[TokenLogprob], first: bool) -> tuple[str, dict | None]:
        """Text and logprobs of a choice (`first`: this piece starts the choice, echo goes first)."""
        if first and self.body.echo:
            text = self.prompt_text(p) + text
            if self.body.logprobs is not None:
                prompt_ids = out.prompt_token_ids
                token_ids = prompt_ids + token_ids
                logprobs = list(out.prompt_logprobs or [None] * len(prompt_ids)) + logprobs
        if self.body.logprobs is None:
            return text, None
        lp = self.logprobs(token_ids, logprobs, self.offsets[index])
        self.offsets[index] += sum(len(s) for s in lp["tokens"])
        return text, lp

    def logprobs(self, token_ids: list[int], entries: list[TokenLogprob | None], offset: int) -> dict:
        """OpenAI's completion `logprobs` object for `token_ids`, starting at text offset `offset`."""
        as_ids = self.body.return_tokens_as_token_ids
        result: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, entry in zip(token_ids, entries):
            s = token_str(self.tokenizer, token_id, as_ids)
            result["tokens"].append(s)
            result["text_offset"].append(offset)
            offset += len(s)
            if entry is None:
                result["token_logprobs"].append(None)
                result["top_logprobs"].append(None)
                continue
            result["token_logprobs"].append(clamp(entry.logprob))
            top = {token_str(self.tokenizer, t, as_ids): clamp(lp) for t, lp in entry.top}
            top.setdefault(s, clamp(entry.logprob))
            result["top_logprobs"].append(top)
        return result


router = APIRouter()
SSE_RESPONSES = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                       "description": "JSON, or server-sent events with `stream: true`"}}


@router.post("/v1/completions", response_model=CompletionResponse, responses=SSE_RESPONSES)
async def create_completion(body: CompletionRequest, request: HTTPRequest):
    serving: OpenAIServingCompletion = request.app.state.serving_completion
    return await serving.create(body, request)
