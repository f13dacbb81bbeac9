"""POST /v1/chat/completions: messages rendered with the tokenizer's chat template, else a plain one.

The tokenizer's template (`chat_template` in tokenizer_config.json, Jinja, as in HF) runs in a
sandboxed Jinja environment. Checkpoints without one (the ELAS base models) get the documented
plain template: one `role: content` line per message, then `assistant:` to be completed.
Streams send the assistant role with the first output, as vLLM does.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import Any, Literal

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from elas_serve.outputs import RequestOutput, TokenLogprob
from elas_serve.sampling_params import InvalidRequestError, SamplingParams
from elas_serve.tokenizer import Tokenizer

from .completion import SSE_RESPONSES
from .protocol import Bool, ChatMessage, Int, PromptLogprob, SamplingFields, Str, Usage, error_body, ranged
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

PLAIN_TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: ranged("max_tokens", Int) | None = None
    max_completion_tokens: ranged("max_tokens", Int) | None = None
    logprobs: Bool = False
    top_logprobs: ranged("logprobs", Int) | None = None
    add_generation_prompt: Bool = True
    echo: Bool = False  # vLLM's: prepend the last message when it is the assistant's
    chat_template: Str | None = None  # vLLM's: this request's template
    chat_template_kwargs: dict[Str, Any] | None = None  # vLLM's: more variables for the template

    def to_sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs to be true", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens, logprobs, None)


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatLogprobEntry(ChatTokenLogprob):
    top_logprobs: list[ChatTokenLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobEntry]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "abort"] | None
    stop_reason: str | int | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None  # with `prompt_logprobs`


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def check_chat_template(template: str) -> None:
    """Refuse (ValueError: exit 2 at start-up) a template that does not compile."""
    from jinja2.exceptions import TemplateError
    try:
        _compile(template)
    except TemplateError as e:
        raise ValueError(f"--chat-template does not compile: {e}") from None


def render_chat(tokenizer: Tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True,
                template: str | None = None, **variables: Any) -> str:
    """The prompt text of `messages`: `template`, else the tokenizer's, else the plain one."""
    from jinja2.exceptions import TemplateError

    try:
        return _compile(template or tokenizer.chat_template or PLAIN_TEMPLATE).render(
            **variables, messages=[{"role": m.role, "content": m.text()} for m in messages],
            add_generation_prompt=add_generation_prompt, eos_token=tokenizer.eos_token or "", bos_token="")
    except TemplateError as e:
        raise InvalidRequestError(f"the chat template failed on these messages: {e}", "messages") from None


class OpenAIServingChat(OpenAIServing):

    def render(self, body: ChatCompletionRequest) -> str:
        return render_chat(self.tokenizer, body.messages, body.add_generation_prompt,
                           body.chat_template or self.chat_template, **(body.chat_template_kwargs or {}))

    def logprobs(self, token_ids: list[int], entries: list[TokenLogprob]) -> dict:
        def item(token_id: int, logprob: float) -> dict:
            s = token_str(self.tokenizer, token_id, False)
            return {"token": s, "logprob": clamp(logprob), "bytes": list(s.encode("utf-8"))}

        return {"content": [{**item(t, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]}
                            for t, e in zip(token_ids, entries)]}

    async def create(self, body: ChatCompletionRequest, http: HTTPRequest):
        self.check_model(body.model)
        params = body.to_sampling_params()
        prompt = await asyncio.to_thread(self.render, body)
        prepared = await self.prepare([prompt], params)
        streams = self.submit(prepared, params)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        num_prompt = len(prepared[0].prompt_token_ids)
        last = body.messages[-1]
        echo = last.text() if body.echo and last.role == "assistant" else ""
        if body.stream:
            return SSEResponse(self._stream(body, streams, head, num_prompt, params.n, echo), streams)
        results = await collect(http, streams)
        if results is None:
            return client_gone()
        return await asyncio.to_thread(self._response, body, head, results[0], num_prompt, echo)

    def _response(self, body: ChatCompletionRequest, head: dict, result: RequestOutput, num_prompt: int,
                  echo: str) -> JSONResponse:
        completion_tokens = sum(len(c.token_ids) for c in result.outputs)
        response = {
            **head, "object": "chat.completion",
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": echo + c.text},
                         "logprobs": self.logprobs(c.token_ids, c.logprobs or []) if body.logprobs else None,
                         "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                        for c in result.outputs],
            "usage": usage(num_prompt, completion_tokens, result.num_cached_tokens)}
        if body.prompt_logprobs is not None:
            response["prompt_logprobs"] = prompt_logprobs_json(self.tokenizer, result.prompt_logprobs)
        return JSONResponse(response)

    async def _stream(self, body: ChatCompletionRequest, streams: list, head: dict, num_prompt: int,
                      n: int, echo: str) -> AsyncIterator[str]:
        head = {**head, "object": "chat.completion.chunk"}
        opts = body.stream_options
        include_usage = bool(opts and opts.include_usage)

        def chunk(choice: dict) -> str:
            data = {**head, "choices": [choice]}
            return sse({**data, "usage": None} if include_usage else data)

        generated, started, cached = 0, False, 0
        try:
            async for _, out in merged_stream(streams):
                cached = out.num_cached_tokens
                if not started:  # the role comes first, as OpenAI sends it
                    started = True
                    for i in range(n):
                        yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None})
                        if echo:
                            yield chunk({"index": i, "delta": {"content": echo}, "logprobs": None,
                                         "finish_reason": None})
                for c in out.outputs:
                    generated += len(c.token_ids)
                    if not c.token_ids and not c.text and not c.finished:
                        continue
                    lp = self.logprobs(c.token_ids, c.logprobs or []) if body.logprobs else None
                    yield chunk({"index": c.index, "delta": {"content": c.text}, "logprobs": lp,
                                 "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(num_prompt, generated, cached)})
        except Exception as e:  # noqa: BLE001 (reported in-band: the status line is already sent)
            yield sse(error_body(500, f"the request failed while streaming: {e}"))
        yield sse("[DONE]")


router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=SSE_RESPONSES)
async def create_chat_completion(body: ChatCompletionRequest, request: HTTPRequest):
    serving: OpenAIServingChat = request.app.state.serving_chat
    return await serving.create(body, request)
