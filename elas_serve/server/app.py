"""The FastAPI application: routes, error mapping, API key, body limit, drain state, OpenAPI schema.

Every error leaves as `{"error": {...}}` (design section 5): 400 for bad input (FastAPI's 422
included), 401 for a wrong or missing API key (with `WWW-Authenticate: Bearer`), 404 for an unknown
model or route, 405 for a wrong method (with `Allow`), 413 for a body over the limit (sized or
chunked), 500 when the engine failed on this request, 503 when the queue is full, the server is
draining or the engine is dead. The checks that must see every request (API key, body size, drain)
are plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide client disconnects from the
handlers. `/openapi.json` documents exactly this: the error schema for every error status, no 422.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from elas_serve import __version__
from elas_serve.engine.async_engine import EngineDeadError, RequestFailedError
from elas_serve.errors import InvalidRequestError

from .chat import create_chat_completion, render_chat
from .completions import create_completion
from .metrics import PrometheusMetrics
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
    error_body,
)
from .serving import INLINE_PROMPT_SIZE, ModelNotFound, ServerState, ServiceUnavailable
from .tokenizer_worker import TokenizerWorker

OPEN_PATHS = ("/health", "/metrics")  # no API key needed
DEFAULT_MAX_BODY_BYTES = 16 << 20
ERROR_STATUSES = (400, 401, 404, 413, 500, 503)
JSON_SLICE = 16384  # list items serialized per call when building large bodies
WORKER_PROMPT_CHARS = 1 << 20  # /tokenize prompts larger than this go to the tokenizer worker process


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    headers = {**({"Retry-After": "1"} if status == 503 else {}), **(headers or {})}
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers or None)


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"The request body is larger than {limit} bytes.")


class GuardMiddleware:
    """API key (Bearer), request body size, and 503 while draining, before any route runs.

    A body sent without a content-length (chunked) is read here, up to the limit, and replayed
    to the app; later messages (the client's disconnect) pass through."""

    def __init__(self, app, state: ServerState, api_key: str | None, max_body_bytes: int):
        self.app, self.state, self.api_key, self.max_body_bytes = app, state, api_key, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        if self.state.draining and path != "/metrics":
            return await error_response(503, "The server is shutting down.")(scope, receive, send)
        if self.api_key is not None and path not in OPEN_PATHS:
            if headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {self.api_key}":
                return await error_response(401, "Invalid or missing API key.",
                                            headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        too_large = error_response(413, str(BodyTooLarge(self.max_body_bytes)))
        length = headers.get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_body_bytes:
                return await too_large(scope, receive, send)
            return await self.app(scope, receive, send)
        if scope.get("method") in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before the body was read
                return
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return await too_large(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(state: ServerState, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    metrics = PrometheusMetrics(state.llm, state.model_name, state.llm.engine.ffn_backend)

    tokenizer_worker = TokenizerWorker(state.tokenizer.name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.llm.engine.stat_loggers.append(metrics)
        yield
        await tokenizer_worker.aclose()
        state.llm.shutdown()

    errors = {status: {"model": ErrorResponse} for status in ERROR_STATUSES}
    app = FastAPI(title="elas-serve", version=__version__, lifespan=lifespan, responses=errors)
    app.state.server = state
    app.state.metrics = metrics
    app.add_middleware(GuardMiddleware, state=state, api_key=api_key, max_body_bytes=max_body_bytes)
    _add_error_handlers(app)
    app.openapi = lambda: _openapi(app, api_key is not None)  # type: ignore[method-assign]
    sse = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                 "description": "JSON, or server-sent events with `stream: true`"}}

    @app.post("/v1/completions", response_model=CompletionResponse, responses=sse)
    async def completions(body: CompletionRequest, request: HTTPRequest):
        return await create_completion(body, request, state)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=sse)
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
        return await create_chat_completion(body, request, state)

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        card = ModelCard(id=state.model_name, created=state.created, root=str(state.llm.engine.config.model),
                         max_model_len=state.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.get("/health", response_class=Response, responses={200: {"description": "the engine is running (empty body)"}})
    async def health():
        if state.llm.is_dead:
            return error_response(503, str(state.llm.error or "The engine is not running."))
        return Response(status_code=200)

    @app.get("/version", response_model=VersionResponse)
    async def version():
        return JSONResponse({"version": __version__})

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest):
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("give exactly one of prompt and messages", "prompt")
        size = len(body.prompt) if body.prompt is not None else sum(len(m.text()) for m in body.messages)
        if size <= INLINE_PROMPT_SIZE:
            return _tokenize(state, body)
        if body.prompt is None or size <= WORKER_PROMPT_CHARS or not Path(state.tokenizer.name).is_file():
            return await asyncio.to_thread(_tokenize, state, body)
        return Response(await tokenizer_worker.tokenize(body.prompt, body.add_special_tokens, body.return_token_strs,
                                                        state.max_model_len), media_type="application/json")

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest):
        state.check_model(body.model)
        vocab = state.llm.engine.model.config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "tokens")
        if len(body.tokens) <= INLINE_PROMPT_SIZE:
            return JSONResponse({"prompt": state.tokenizer.decode(body.tokens)})
        return JSONResponse({"prompt": await asyncio.to_thread(state.tokenizer.decode, body.tokens)})

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = state.tokenizer
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eos_token,
                "eos_token_ids": tok.eos_token_ids, "model_max_length": state.max_model_len,
                "vocab_size": tok.vocab_size, "chat_template": tok.chat_template}

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _tokenize(state: ServerState, body: TokenizeRequest) -> Response:
    """/tokenize's work, which grows with the input (run off the loop for large ones).

    NOTE: the JSON is built in slices: one `json.dumps` of a million-token list would hold the
    GIL, and so the event loop, for half a second."""
    tok = state.tokenizer
    if body.messages is not None:
        ids = tok.encode(render_chat(state, body.messages, body.add_generation_prompt))
    else:
        ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    parts = [f'{{"count": {len(ids)}, "max_model_len": {state.max_model_len}, "tokens": [']
    parts += [(", " if i else "") + ", ".join(map(str, ids[i:i + JSON_SLICE])) for i in range(0, len(ids), JSON_SLICE)]
    if body.return_token_strs:
        strs = [tok.id_to_token(i) for i in ids]
        parts.append('], "token_strs": [')
        parts += [(", " if i else "") + json.dumps(strs[i:i + JSON_SLICE], ensure_ascii=False)[1:-1]
                  for i in range(0, len(strs), JSON_SLICE)]
    parts.append("]}")
    return Response("".join(parts).encode("utf-8"), media_type="application/json")


def _openapi(app: FastAPI, bearer: bool) -> dict[str, Any]:
    """FastAPI's schema, made true to the server: validation errors are 400s with the error body
    (no 422, no HTTPValidationError), and the bearer scheme is declared when a key is set."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for item in schema.get("paths", {}).values():
            for op in item.values():
                op.get("responses", {}).pop("422", None)
                if bearer:
                    op["security"] = [{"bearer": []}]
        comps = schema.setdefault("components", {})
        for name in ("HTTPValidationError", "ValidationError"):
            comps.get("schemas", {}).pop(name, None)
        if bearer:
            comps["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path in OPEN_PATHS:
                for op in schema["paths"].get(path, {}).values():
                    op["security"] = []
        app.openapi_schema = schema
    return app.openapi_schema


def _is_type_tag(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none"))


def _add_error_handlers(app: FastAPI) -> None:
    def handler(exc_type: type, status: int, param: Callable | None = None) -> None:
        async def handle(request: HTTPRequest, exc: Exception) -> JSONResponse:
            return error_response(status, str(exc), param(exc) if param else None)
        app.add_exception_handler(exc_type, handle)

    handler(InvalidRequestError, 400, lambda e: e.param)
    handler(ModelNotFound, 404)
    handler(ServiceUnavailable, 503)
    handler(EngineDeadError, 503)
    handler(RequestFailedError, 500)
    handler(BodyTooLarge, 413)

    async def validation(request: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        # NOTE: a union field reports one error per member: a failed check of ours (value_error)
        # says more than "should be a valid string"; pydantic also puts the member tried in the
        # location ("str", "list[int]", ...), which is dropped
        errs = exc.errors()
        err = next((e for e in errs if e.get("type") == "value_error"), errs[0])
        loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _is_type_tag(p)]
        if err.get("type") == "json_invalid":
            return error_response(400, f"The request body is not valid JSON: {err.get('msg')}")
        where = ".".join(loc) or "body"
        got = json.dumps(err.get("input"), default=str, ensure_ascii=True)[:200]
        return error_response(400, f"{where}: {err.get('msg')} (got {got})", loc[0] if loc else None)

    async def http_error(request: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"No route {request.url.path}", 405: f"Method {request.method} not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, headers=exc.headers)

    async def internal(request: HTTPRequest, exc: Exception) -> JSONResponse:
        return error_response(500, f"Internal error: {type(exc).__name__}")

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal)
