"""POST /v1/completions: OpenAI's text completions, vLLM's extensions, streaming over SSE.

Choices are flattened across prompts and `n` (index = prompt * n + sample). With `echo`, the
prompt comes first in `text` and, with `logprobs`, in the log-probs too, whose first entry is
null (nothing scores the first token): what lm-evaluation-harness's loglikelihood relies on.
Usage counts each prompt once and every generated token.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse

from elas_serve.engine.request import TokenLogprob

from .protocol import CompletionRequest, error_body
from .serving import (
    Choice,
    ServerState,
    SSEResponse,
    clamp,
    client_gone,
    collect,
    merged_stream,
    prepare,
    submit,
    token_str,
)


def completion_logprobs(state: ServerState, token_ids: list[int], entries: list[TokenLogprob | None],
                        as_ids: bool, offset: int = 0) -> dict:
    """OpenAI's completion `logprobs` object for `token_ids`, starting at text offset `offset`."""
    tok = state.tokenizer
    result: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in zip(token_ids, entries):
        s = token_str(tok, token_id, as_ids)
        result["tokens"].append(s)
        result["text_offset"].append(offset)
        offset += len(s)
        if entry is None:
            result["token_logprobs"].append(None)
            result["top_logprobs"].append(None)
            continue
        result["token_logprobs"].append(clamp(entry.logprob))
        top = {token_str(tok, t, as_ids): clamp(lp) for t, lp in entry.top}
        top.setdefault(s, clamp(entry.logprob))
        result["top_logprobs"].append(top)
    return result


class _Renderer:
    """Text and log-probs of one completion request's choices, whole or as stream deltas."""

    def __init__(self, state: ServerState, body: CompletionRequest, prompts: list, children: list):
        self.state, self.body, self.prompts = state, body, prompts
        self.offsets = [0] * len(children)  # text_offset reached per choice (streaming)

    def prompt_text(self, prompt_index: int) -> str:
        p = self.prompts[prompt_index]
        return p if isinstance(p, str) else self.state.tokenizer.decode(list(p))

    def piece(self, index: int, prompt_index: int, prompt_ids: list[int], text: str, token_ids: list[int],
              logprobs: list[TokenLogprob], prompt_logprobs, first: bool) -> tuple[str, dict | None]:
        """Text and logprobs of a choice (`first`: this piece starts the choice, echo goes first)."""
        if first and self.body.echo:
            text = self.prompt_text(prompt_index) + text
            if self.body.logprobs is not None:
                token_ids = prompt_ids + token_ids
                logprobs = list(prompt_logprobs or [None] * len(prompt_ids)) + logprobs
        if self.body.logprobs is None:
            return text, None
        lp = completion_logprobs(self.state, token_ids, logprobs, self.body.return_tokens_as_token_ids,
                                 self.offsets[index])
        self.offsets[index] += sum(len(s) for s in lp["tokens"])
        return text, lp


def _usage(prompt_token_counts: list[int], completion_tokens: int) -> dict:
    prompt_tokens = sum(prompt_token_counts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def create_completion(body: CompletionRequest, http: HTTPRequest, state: ServerState):
    state.check_model(body.model)
    prompts = body.prompts()
    params = body.to_sampling_params()
    children = await prepare(state, prompts, params)
    streams = submit(state, children)
    n = params.n
    prompt_counts = [children[i * n].num_prompt_tokens for i in range(len(prompts))]
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name}
    render = _Renderer(state, body, prompts, children)
    if body.stream:
        return SSEResponse(_stream(state, body, streams, head, render, prompt_counts), streams)

    choices = [Choice(i // n, c.prompt_token_ids) for i, c in enumerate(children)]
    if not await collect(http, streams, choices):
        return client_gone()
    # NOTE: rendering (detokenizing log-prob tokens, JSON) grows with the response: off the loop
    return await asyncio.to_thread(_response, render, head, choices, prompt_counts)


def _response(render: _Renderer, head: dict, choices: list[Choice], prompt_counts: list[int]) -> JSONResponse:
    result = []
    for i, ch in enumerate(choices):
        text, lp = render.piece(i, ch.prompt_index, ch.prompt_token_ids, ch.text, ch.token_ids,
                                ch.logprobs, ch.prompt_logprobs, first=True)
        result.append({"index": i, "text": text, "logprobs": lp, "finish_reason": ch.finish_reason,
                       "stop_reason": ch.stop_reason})
    usage = _usage(prompt_counts, sum(len(ch.token_ids) for ch in choices))
    return JSONResponse({**head, "choices": result, "usage": usage})


def sse(data: dict | str) -> str:
    """One server-sent event. NOTE: allow_nan=False: a bare NaN is not JSON (log-probs are clamped)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, allow_nan=False)}\n\n"


async def _stream(state: ServerState, body: CompletionRequest, streams: list, head: dict,
                  render: _Renderer, prompt_counts: list[int]) -> AsyncIterator[str]:
    opts = body.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = bool(opts and opts.continuous_usage_stats)
    children = [s.request for s in streams]
    n = len(children) // len(prompt_counts)
    started = [False] * len(children)
    generated = [0] * len(children)
    try:
        async for index, out in merged_stream(streams):
            first = not started[index]
            started[index] = True
            generated[index] += len(out.new_token_ids)
            if not (first and body.echo) and not out.new_token_ids and not out.new_text and not out.finished:
                continue
            text, lp = render.piece(index, index // n, children[index].prompt_token_ids, out.new_text,
                                    out.new_token_ids, out.new_logprobs or [], out.prompt_logprobs, first)
            chunk = {**head, "choices": [{"index": index, "text": text, "logprobs": lp,
                                          "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}]}
            if include_usage:
                chunk["usage"] = _usage(prompt_counts, sum(generated)) if continuous else None
            yield sse(chunk)
        if include_usage:
            yield sse({**head, "choices": [], "usage": _usage(prompt_counts, sum(generated))})
    except Exception as e:  # noqa: BLE001 (reported in-band: the status line is already sent)
        yield sse(error_body(500, f"the request failed while streaming: {e}"))
    yield sse("[DONE]")
