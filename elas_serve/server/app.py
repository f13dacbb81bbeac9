"""The FastAPI application: one router per endpoint module, error mapping, API key, body limit,
drain state, OpenAPI schema. The app knows the engine only as an `EngineClient`.

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
import gc
import json
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from elas_serve import __version__
from elas_serve.config import ServerConfig
from elas_serve.frontend import EngineClient, EngineDeadError, RequestFailedError
from elas_serve.sampling_params import InvalidRequestError

from . import chat, completion, metrics, models, tokenization
from .chat import OpenAIServingChat, check_chat_template
from .completion import OpenAIServingCompletion
from .metrics import LoggingStatLogger, PrometheusMetrics
from .models import OpenAIServingModels
from .protocol import ErrorResponse
from .serving import ModelNotFound, ServerState, ServiceUnavailable, error_response
from .tokenization import OpenAIServingTokenization

OPEN_PATHS = ("/health", "/metrics")  # no API key needed
ERROR_STATUSES = (400, 401, 404, 413, 500, 503)
ROUTERS = (completion.router, chat.router, tokenization.router, models.router, metrics.router)


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


def build_app(client: EngineClient, config: ServerConfig, model_name: str,
              state: ServerState | None = None) -> FastAPI:
    """The server for one `EngineClient`; `state.draining` is set by whoever runs it (SIGTERM)."""
    state = state or ServerState()
    serving = dict(
        serving_completion=OpenAIServingCompletion, serving_chat=OpenAIServingChat,
        serving_tokenization=OpenAIServingTokenization, serving_models=OpenAIServingModels)
    metrics = PrometheusMetrics(client, model_name)
    stats_log = None if config.disable_log_stats else LoggingStatLogger(client, config.log_stats_interval)
    chat_template = config.load_chat_template()
    if chat_template is not None:
        check_chat_template(chat_template)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client.add_stat_logger(metrics)
        if stats_log is not None:
            client.add_stat_logger(stats_log)
            stats_task = asyncio.create_task(stats_log.run())
        await app.state.serving_tokenization.start()
        # NOTE: what start-up made (torch, triton, the app: ~350k objects) is never garbage; left in
        # the collector's generations, every full collection walks it and holds the GIL, so the event
        # loop, for 0.1-0.2 s (measured). vLLM freezes its heap the same way.
        gc.collect()
        gc.freeze()
        yield
        if stats_log is not None:
            stats_task.cancel()
        await app.state.serving_tokenization.stop()
        client.shutdown()
        gc.unfreeze()  # NOTE: so that interpreter exit finalizes it (nanobind reports leaks otherwise)

    errors = {status: {"model": ErrorResponse} for status in ERROR_STATUSES}
    app = FastAPI(title="elas-serve", version=__version__, lifespan=lifespan, responses=errors,
                  root_path=config.root_path)
    app.state.server = state
    app.state.metrics = metrics
    for name, cls in serving.items():
        setattr(app.state, name, cls(client, config, model_name, state, chat_template))
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(GuardMiddleware, state=state, api_key=config.api_key, max_body_bytes=config.max_request_bytes)
    if config.allowed_origins:  # NOTE: outermost, so that preflight requests need no API key
        app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)
    _add_error_handlers(app)
    app.openapi = lambda: _openapi(app, config.api_key is not None)  # type: ignore[method-assign]
    return app


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
