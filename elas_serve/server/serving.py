"""What the endpoints share: `OpenAIServing`, the base of each endpoint's serving class (vLLM's
shape: it holds an `EngineClient` and the server's config, nothing else), the errors that map to
HTTP statuses, and the plumbing of streams: admission, merging the prompts of one request,
server-sent events, client disconnects.

Every prompt of a request is prepared (tokenized and checked) before any is submitted, so a bad
prompt in a list leaves nothing running; admission control and submission happen with no await
in between. Leaving a merged stream early (client gone, error) closes every stream, which aborts
its requests in the engine and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from elas_serve.config import ServerConfig
from elas_serve.frontend import EngineClient, PreparedPrompt, RequestStream
from elas_serve.outputs import RequestOutput
from elas_serve.sampling_params import InvalidRequestError, SamplingParams

from .protocol import error_body

log = logging.getLogger("elas_serve.server")
MIN_LOGPROB = -9999.0  # -inf is not valid JSON (vLLM clamps the same way)
CLIENT_GONE = 499  # nginx's "client closed request": logged, never received


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in OpenAI's shape (503s say when to retry)."""
    headers = {**({"Retry-After": "1"} if status == 503 else {}), **(headers or {})}
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers or None)


class ServiceUnavailable(Exception):
    """Queue full, draining, or engine dead: HTTP 503."""


class ModelNotFound(Exception):
    """A request named a model this server does not serve: HTTP 404."""


class ServerState:
    """Mutable state of the running server: whether it is draining (set by the signal handler)."""

    def __init__(self) -> None:
        self.draining = False
        self.created = int(time.time())


class OpenAIServing:
    def __init__(self, client: EngineClient, config: ServerConfig, model_name: str, state: ServerState,
                 chat_template: str | None = None):
        self.client, self.config, self.model_name, self.state = client, config, model_name, state
        self.chat_template = chat_template  # --chat-template, read and checked

    @property
    def tokenizer(self):
        return self.client.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.client.model_info.max_model_len

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ModelNotFound(f"The model `{model}` does not exist (this server serves `{self.model_name}`).")

    def check_fanout(self, num_prompts: int, n: int) -> None:
        """A request becomes `num_prompts * n` engine requests: refuse (400) what exceeds
        `--max-choices-per-request`, or what the queue limit could never admit."""
        num, limit = num_prompts * n, self.config.max_queued_requests
        param = "n" if n > 1 else "prompt"
        if num > self.config.max_choices_per_request:
            raise InvalidRequestError(f"this request asks for {num} choices ({num_prompts} prompt(s) x n={n}); the "
                                      f"server allows at most {self.config.max_choices_per_request} per request "
                                      f"(--max-choices-per-request)", param)
        if limit is not None and num > limit:
            raise InvalidRequestError(f"this request asks for {num} choices ({num_prompts} prompt(s) x n={n}), "
                                      f"more than the queue ever admits at once ({limit}, --max-queued-requests)",
                                      param)

    async def prepare(self, prompts: list[str | list[int]], params: SamplingParams) -> list[PreparedPrompt]:
        self.check_fanout(len(prompts), params.n)
        return await self.client.prepare(prompts, params)

    def submit(self, prompts: list[PreparedPrompt], params: SamplingParams) -> list[RequestStream]:
        """Admission control, then submit every prompt. NOTE: no await in here, so the check and
        the submissions are atomic with respect to other requests on the event loop."""
        if self.state.draining:
            raise ServiceUnavailable("The server is shutting down and accepts no new requests.")
        if self.client.dead_error is not None:
            raise ServiceUnavailable(str(self.client.dead_error))
        limit, queued = self.config.max_queued_requests, self.client.num_queued
        if limit is not None and queued + len(prompts) * params.n > limit:
            raise ServiceUnavailable(f"The request queue is full ({queued} queued, limit {limit}); retry later.")
        base = uuid.uuid4().hex
        if not self.config.disable_log_requests:
            log.info("request %s: %d prompt(s) of %s tokens, %s", base, len(prompts),
                     ",".join(str(len(p.prompt_token_ids)) for p in prompts[:8]) + ("..." if len(prompts) > 8 else ""),
                     describe_params(params))
        return [self.client.submit(p, params, f"{base}-{i}") for i, p in enumerate(prompts)]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def describe_params(params: SamplingParams) -> str:
    """The sampling params that differ from their defaults, for the request log."""
    default = SamplingParams()
    return ", ".join(f"{f.name}={getattr(params, f.name)!r}" for f in dataclasses.fields(params)
                     if getattr(params, f.name) != getattr(default, f.name)) or "defaults"


def close_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.close()


async def merged_stream(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of every prompt's stream as they come, tagged with the prompt's index; leaving early
    (or an error) closes every stream, aborting the unfinished requests."""
    if len(streams) == 1:  # NOTE: the common case, without a task and a queue per output
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            close_all(streams)
        return
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                merged.put_nowait((index, out))
        except BaseException as e:  # noqa: BLE001 (forwarded to the consumer)
            merged.put_nowait((index, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            index, item = await merged.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                remaining -= 1
            yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        close_all(streams)


class SSEResponse(StreamingResponse):
    """Server-sent events whose engine requests are aborted however the response ends, even when
    the client is gone before the first byte (then the body iterator never starts)."""

    def __init__(self, content: AsyncIterator[str], streams: list[RequestStream]):
        super().__init__(content, media_type="text/event-stream")
        self.streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close_all(self.streams)


def sse(data: dict | str) -> str:
    """One server-sent event. NOTE: allow_nan=False: a bare NaN is not JSON (log-probs are clamped)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, allow_nan=False)}\n\n"


async def wait_for_disconnect(request: HTTPRequest) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_unless_disconnected(request: HTTPRequest, coro) -> bool:
    """Run `coro`; if the client goes away first, cancel it (aborting its engine requests).
    Returns False when the client is gone (nobody is left to answer)."""
    work = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        return False
    work.result()  # re-raise what the work raised
    return True


async def collect(http: HTTPRequest, streams: list[RequestStream]) -> list[RequestOutput] | None:
    """Every prompt's whole result (completions accumulated from the deltas), or None if the client
    left first (then every request was aborted)."""
    results: list[RequestOutput | None] = [None] * len(streams)

    async def run() -> None:
        async for index, delta in merged_stream(streams):
            if results[index] is None:
                results[index] = delta
                continue
            result = results[index]
            for c in delta.outputs:
                for whole in result.outputs:
                    if whole.index == c.index:
                        whole.add(c)
                        break
                else:
                    result.outputs.append(c)
            result.prompt_logprobs = result.prompt_logprobs or delta.prompt_logprobs
            result.finished = delta.finished

    try:
        ok = await run_unless_disconnected(http, run())
    finally:
        close_all(streams)
    for r in results if ok else ():
        r.outputs.sort(key=lambda c: c.index)
    return results if ok else None  # type: ignore[return-value]


def client_gone() -> Response:
    return Response(status_code=CLIENT_GONE)


def token_str(tokenizer, token_id: int, as_id: bool) -> str:
    return f"token_id:{token_id}" if as_id else tokenizer.decode([token_id], skip_special_tokens=False)


def prompt_logprobs_json(tokenizer, entries: list | None) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first, else {token id: {logprob,
    rank, decoded_token}} for the prompt's token and the top alternatives."""
    if entries is None:
        return None

    def item(token_id: int, logprob: float, rank: int) -> dict:
        return {"logprob": clamp(logprob), "rank": rank, "decoded_token": token_str(tokenizer, token_id, False)}

    out: list[dict | None] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        top = {str(t): item(t, lp, r) for r, (t, lp) in enumerate(e.top, start=1)}
        top.setdefault(str(e.token_id), item(e.token_id, e.logprob, e.rank))
        out.append(top)
    return out


def clamp(logprob: float) -> float:
    """A log-prob JSON can carry: -inf (and NaN, which never should get here) become MIN_LOGPROB."""
    return logprob if logprob > MIN_LOGPROB else MIN_LOGPROB
