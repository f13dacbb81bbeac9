"""GET /v1/models, /v1/models/{id}, /health and /version: what is served, and whether it is up.

/health is 200 with an empty body while the engine serves, 503 with the reason once it is dead
(so an orchestrator restarts the server) or while the server drains.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response

from elas_serve import __version__

from .protocol import ModelCard, ModelList, VersionResponse
from .serving import ModelNotFound, OpenAIServing, error_response


class OpenAIServingModels(OpenAIServing):
    def card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.state.created, root=self.client.model_info.model,
                         max_model_len=self.max_model_len)


router = APIRouter()


def _serving(request: HTTPRequest) -> OpenAIServingModels:
    return request.app.state.serving_models


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: HTTPRequest):
    return JSONResponse(ModelList(data=[_serving(request).card()]).model_dump())


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, request: HTTPRequest):
    serving = _serving(request)
    if model_id != serving.model_name:
        raise ModelNotFound(f"The model `{model_id}` does not exist (this server serves `{serving.model_name}`).")
    return JSONResponse(serving.card().model_dump())


@router.get("/health", response_class=Response, responses={200: {"description": "the engine is running (empty body)"}})
async def health(request: HTTPRequest):
    dead = _serving(request).client.dead_error
    if dead is not None:
        return error_response(503, str(dead))
    return Response(status_code=200)


@router.get("/version", response_model=VersionResponse)
async def version():
    return JSONResponse({"version": __version__})
