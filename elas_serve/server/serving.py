"""What the completion endpoints share: fanning a request out into engine requests (prompts x n),
merging their streams, admission control, and rendering tokens and log-probs.

Every child request is validated before any is submitted, so a bad prompt in a list leaves nothing
running. Leaving a merged stream early (client gone, error) cancels every child, which aborts it
in the engine and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse

from elas_serve.config import DEFAULT_MAX_CHOICES
from elas_serve.engine.async_engine import AsyncLLM, RequestStream
from elas_serve.engine.request import Request, RequestOutput, TokenLogprob
from elas_serve.errors import InvalidRequestError
from elas_serve.sampling_params import SamplingParams
from elas_serve.tokenizer import Tokenizer

MIN_LOGPROB = -9999.0  # -inf is not valid JSON (vLLM clamps the same way)
INLINE_PROMPT_SIZE = 4096  # characters or token ids: prompts up to this size are prepared on the loop


class ServiceUnavailable(Exception):
    """Queue full, draining, or engine dead: HTTP 503."""


class ModelNotFound(Exception):
    """A request named a model this server does not serve: HTTP 404."""


@dataclass
class ServerState:
    llm: AsyncLLM
    model_name: str
    max_queued_requests: int | None = None
    max_choices_per_request: int = DEFAULT_MAX_CHOICES
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if self.max_queued_requests is not None and self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be at least 1 (or unset for no limit), "
                             f"got {self.max_queued_requests}")
        if self.max_choices_per_request < 1:
            raise ValueError(f"max_choices_per_request must be at least 1, got {self.max_choices_per_request}")

    @property
    def tokenizer(self) -> Tokenizer:
        return self.llm.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.llm.engine.max_model_len

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ModelNotFound(f"The model `{model}` does not exist (this server serves `{self.model_name}`).")


@dataclass
class Choice:
    """Accumulated result of one child request (one choice of the response)."""

    prompt_index: int
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        self.logprobs += out.new_logprobs or []
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason


def check_fanout(state: ServerState, num_prompts: int, n: int) -> None:
    """A request becomes `num_prompts * n` engine requests: refuse (400) what exceeds
    `--max-choices-per-request`, or what the queue limit could never admit."""
    num = num_prompts * n
    param = "n" if n > 1 else "prompt"
    if num > state.max_choices_per_request:
        raise InvalidRequestError(f"this request asks for {num} choices ({num_prompts} prompt(s) x n={n}); the "
                                  f"server allows at most {state.max_choices_per_request} per request "
                                  f"(--max-choices-per-request)", param)
    if state.max_queued_requests is not None and num > state.max_queued_requests:
        raise InvalidRequestError(f"this request asks for {num} choices ({num_prompts} prompt(s) x n={n}), more "
                                  f"than the queue ever admits at once ({state.max_queued_requests}, "
                                  f"--max-queued-requests)", param)


def _tokenize(state: ServerState, prompts: list[str | list[int]]) -> list[list[int] | None]:
    """Token ids of the text prompts (None for token-id prompts). A text that cannot fit the
    context whatever its tokenization is refused before tokenizing it."""
    tok, limit = state.tokenizer, state.max_model_len
    texts = {i: p for i, p in enumerate(prompts) if isinstance(p, str) and p}
    for i, text in texts.items():
        # NOTE: a token stands for at most max_token_bytes bytes; the 2x margin covers normalizers
        # that shrink the text (accent stripping) before it is split
        at_least = len(text) // (2 * tok.max_token_bytes)
        if at_least > limit:
            where = f"prompt {i}: " if len(prompts) > 1 else ""
            raise InvalidRequestError(
                f"{where}This model's maximum context length is {limit} tokens. However, your prompt "
                f"contains at least {at_least} input tokens, which leaves no room for the completion.", "prompt")
    ids = dict(zip(texts, tok.encode_batch(list(texts.values())))) if texts else {}
    return [ids.get(i) for i in range(len(prompts))]


def make_children(state: ServerState, prompts: list[str | list[int]], params: SamplingParams
                  ) -> list[Request]:
    """Validated engine requests, prompt-major then sample index (the choice order). Takes time
    proportional to the prompts: call it on a worker thread (`prepare`), never on the event loop."""
    engine = state.llm.engine
    base = uuid.uuid4().hex
    children = []
    for i, (prompt, ids) in enumerate(zip(prompts, _tokenize(state, prompts))):
        for j in range(params.n):
            try:
                children.append(engine.make_request(f"{base}-{i}-{j}", prompt if ids is None else ids,
                                                    params.child(j)))
            except InvalidRequestError as e:
                raise InvalidRequestError(f"prompt {i}: {e}" if len(prompts) > 1 else str(e), e.param) from None
            prompt, ids = children[-1].prompt_token_ids, None  # tokenized and checked once per prompt
    return children


async def prepare(state: ServerState, prompts: list[str | list[int]], params: SamplingParams) -> list[Request]:
    """Fan-out limits, then `make_children`: inline for small prompts, else on a worker thread."""
    check_fanout(state, len(prompts), params.n)
    if sum(len(p) for p in prompts) <= INLINE_PROMPT_SIZE:
        return make_children(state, prompts, params)
    return await asyncio.to_thread(make_children, state, prompts, params)


def submit(state: ServerState, children: list[Request]) -> list[RequestStream]:
    """Admission control, then submit every child. NOTE: no await in here, so the check and the
    submissions are atomic with respect to other requests on the event loop."""
    if state.draining:
        raise ServiceUnavailable("The server is shutting down and accepts no new requests.")
    if state.llm.is_dead:
        raise ServiceUnavailable("The engine is not running.")
    limit = state.max_queued_requests
    if limit is not None and state.llm.num_queued + len(children) > limit:
        raise ServiceUnavailable(f"The request queue is full ({state.llm.num_queued} queued, limit {limit}); "
                                 "retry later.")
    return [state.llm.submit(req) for req in children]


def close_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.close()


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


async def merged_stream(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of all children as they come, tagged with the child's index; leaving early (or an
    error) closes every stream, aborting the unfinished requests."""
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


async def collect(http: HTTPRequest, streams: list[RequestStream], choices: list[Choice]) -> bool:
    """Run every child to the end into `choices`; False if the client left first (then every
    child was aborted)."""
    async def run() -> None:
        async for index, out in merged_stream(streams):
            choices[index].add(out)

    try:
        return await run_unless_disconnected(http, run())
    finally:
        close_all(streams)


CLIENT_GONE = 499  # nginx's "client closed request": logged, never received


def client_gone() -> Response:
    return Response(status_code=CLIENT_GONE)


def token_str(tokenizer: Tokenizer, token_id: int, as_id: bool) -> str:
    return f"token_id:{token_id}" if as_id else tokenizer.decode([token_id], skip_special_tokens=False)


def clamp(logprob: float) -> float:
    """A log-prob JSON can carry: -inf (and NaN, which never should get here) become MIN_LOGPROB."""
    return logprob if logprob > MIN_LOGPROB else MIN_LOGPROB
