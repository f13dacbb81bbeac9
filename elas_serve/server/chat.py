"""POST /v1/chat/completions: messages rendered with the tokenizer's chat template, else a plain one.

The tokenizer's template (`chat_template` in tokenizer_config.json, Jinja, as in HF) runs in a
sandboxed Jinja environment. Checkpoints without one (the ELAS base models) get the documented
plain template: one `role: content` line per message, then `assistant:` to be completed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from functools import lru_cache

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse

from elas_serve.engine.request import TokenLogprob
from elas_serve.errors import InvalidRequestError

from .completions import sse
from .protocol import ChatCompletionRequest, ChatMessage, error_body
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

PLAIN_TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
    from jinja2.exceptions import TemplateError

    tok = state.tokenizer
    template = tok.chat_template or PLAIN_TEMPLATE
    try:
        return _compile(template).render(
            messages=[{"role": m.role, "content": m.text()} for m in messages],
            add_generation_prompt=add_generation_prompt, eos_token=tok.eos_token or "", bos_token="")
    except TemplateError as e:
        raise InvalidRequestError(f"the chat template failed on these messages: {e}", "messages") from None


def chat_logprobs(state: ServerState, token_ids: list[int], entries: list[TokenLogprob]) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        s = token_str(state.tokenizer, token_id, False)
        return {"token": s, "logprob": clamp(logprob), "bytes": list(s.encode("utf-8"))}

    return {"content": [{**item(t, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]}
                        for t, e in zip(token_ids, entries)]}


async def create_chat_completion(body: ChatCompletionRequest, http: HTTPRequest, state: ServerState):
    state.check_model(body.model)
    params = body.to_sampling_params()
    prompt = await asyncio.to_thread(render_chat, state, body.messages, body.add_generation_prompt)
    children = await prepare(state, [prompt], params)
    streams = submit(state, children)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
    num_prompt = children[0].num_prompt_tokens
    if body.stream:
        return SSEResponse(_stream(state, body, streams, head, num_prompt), streams)
    choices = [Choice(0, c.prompt_token_ids) for c in children]
    if not await collect(http, streams, choices):
        return client_gone()
    return await asyncio.to_thread(_response, state, body, head, choices, num_prompt)


def _response(state: ServerState, body: ChatCompletionRequest, head: dict, choices: list[Choice],
              num_prompt: int) -> JSONResponse:
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return JSONResponse({
        **head, "object": "chat.completion",
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                     "logprobs": chat_logprobs(state, c.token_ids, c.logprobs) if body.logprobs else None,
                     "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                    for i, c in enumerate(choices)],
        "usage": {"prompt_tokens": num_prompt, "completion_tokens": completion_tokens,
                  "total_tokens": num_prompt + completion_tokens}})


async def _stream(state: ServerState, body: ChatCompletionRequest, streams: list, head: dict,
                  num_prompt: int) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk"}
    opts = body.stream_options
    include_usage = bool(opts and opts.include_usage)
    generated = 0
    try:
        for i in range(len(streams)):  # the role comes first, as OpenAI sends it
            chunk = {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]}
            yield sse({**chunk, "usage": None} if include_usage else chunk)
        async for index, out in merged_stream(streams):
            generated += len(out.new_token_ids)
            if not out.new_token_ids and not out.new_text and not out.finished:
                continue
            lp = chat_logprobs(state, out.new_token_ids, out.new_logprobs or []) if body.logprobs else None
            chunk = {**head, "choices": [{"index": index, "delta": {"content": out.new_text}, "logprobs": lp,
                                          "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}]}
            yield sse({**chunk, "usage": None} if include_usage else chunk)
        if include_usage:
            yield sse({**head, "choices": [], "usage": {"prompt_tokens": num_prompt, "completion_tokens": generated,
                                                        "total_tokens": num_prompt + generated}})
    except Exception as e:  # noqa: BLE001 (reported in-band: the status line is already sent)
        yield sse(error_body(500, f"the request failed while streaming: {e}"))
    yield sse("[DONE]")
