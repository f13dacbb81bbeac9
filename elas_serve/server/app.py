"""The FastAPI application: routes, error mapping, API key, body limit, drain state.

Every error leaves as `{"error": {...}}` (design section 5): 400 for bad input (FastAPI's 422
included), 401 for a wrong or missing API key, 404 for an unknown model or route, 413 for a body
over the limit, 503 when the queue is full, the server is draining or the engine is dead.
The checks that must see every request (API key, body size, drain) are plain ASGI middleware:
Starlette's BaseHTTPMiddleware would hide client disconnects from the handlers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from elas_serve import __version__
from elas_serve.engine.async_engine import EngineDeadError
from elas_serve.errors import InvalidRequestError

from .chat import create_chat_completion, render_chat
from .completions import create_completion
from .metrics import PrometheusMetrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    TokenizeRequest,
    error_body,
)
from .serving import ModelNotFound, ServerState, ServiceUnavailable

OPEN_PATHS = ("/health", "/metrics")  # no API key needed
DEFAULT_MAX_BODY_BYTES = 16 << 20


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


class GuardMiddleware:
    """API key (Bearer), request body size, and 503 while draining, before any route runs."""

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
                return await error_response(401, "Invalid or missing API key.")(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await error_response(413, str(BodyTooLarge(self.max_body_bytes)))(scope, receive, send)
        received = 0

        async def counting_receive():  # bodies sent without a content-length are counted as read
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise BodyTooLarge(self.max_body_bytes)
            return message

        await self.app(scope, counting_receive, send)


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"The request body is larger than {limit} bytes.")


def create_app(state: ServerState, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    metrics = PrometheusMetrics(state.llm, state.model_name, state.llm.engine.ffn_backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.llm.engine.stat_loggers.append(metrics)
        yield
        state.llm.shutdown()

    app = FastAPI(title="elas-serve", version=__version__, lifespan=lifespan)
    app.state.server = state
    app.state.metrics = metrics
    app.add_middleware(GuardMiddleware, state=state, api_key=api_key, max_body_bytes=max_body_bytes)
    _add_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        return await create_completion(body, request, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
        return await create_chat_completion(body, request, state)

    @app.get("/v1/models")
    async def models():
        card = ModelCard(id=state.model_name, created=state.created, root=str(state.llm.engine.config.model),
                         max_model_len=state.max_model_len)
        return {"object": "list", "data": [card.model_dump()]}

    @app.get("/health")
    async def health():
        if state.llm.is_dead:
            return error_response(503, "The engine is not running.")
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("give exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            ids = state.tokenizer.encode(render_chat(state, body.messages, body.add_generation_prompt))
        else:
            ids = state.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        result = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}
        if body.return_token_strs:
            result["token_strs"] = [state.tokenizer.id_to_token(i) for i in ids]
        return result

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        state.check_model(body.model)
        vocab = state.llm.engine.model.config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = state.tokenizer
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eos_token,
                "eos_token_ids": tok.eos_token_ids, "model_max_length": state.max_model_len,
                "vocab_size": tok.vocab_size, "chat_template": tok.chat_template}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    def handler(exc_type: type, status: int, param: Callable | None = None) -> None:
        async def handle(request: HTTPRequest, exc: Exception) -> JSONResponse:
            return error_response(status, str(exc), param(exc) if param else None)
        app.add_exception_handler(exc_type, handle)

    handler(InvalidRequestError, 400, lambda e: e.param)
    handler(ModelNotFound, 404)
    handler(ServiceUnavailable, 503)
    handler(EngineDeadError, 503)
    handler(BodyTooLarge, 413)

    async def validation(request: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return error_response(400, f"The request body is not valid JSON: {err.get('msg')}")
        where = ".".join(loc) or "body"
        return error_response(400, f"{where}: {err.get('msg')} (got {json.dumps(err.get('input'), default=str)[:200]})",
                              loc[0] if loc else None)

    async def http_error(request: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"No route {request.url.path}", 405: f"Method {request.method} not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message)

    async def internal(request: HTTPRequest, exc: Exception) -> JSONResponse:
        return error_response(500, f"Internal error: {type(exc).__name__}")

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal)

