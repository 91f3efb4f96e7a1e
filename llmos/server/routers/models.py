"""GET /v1/models: the generation model and the embedding model this server runs."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from llmos.server.auth import Principal, authenticate, get_state
from llmos.server.errors import not_found
from llmos.server.routers.common import errors
from llmos.server.schemas.openai import Model, ModelList
from llmos.server.state import ServerState

router = APIRouter(tags=["openai"])


def _models(state: ServerState) -> list[Model]:
    return [Model(id=state.model_name, created=state.started), Model(id=state.embedder.name, created=state.started)]


@router.get("/v1/models", response_model=ModelList, responses=errors(401))
async def list_models(principal: Principal = Depends(authenticate), state: ServerState = Depends(get_state)):
    return ModelList(data=_models(state))


@router.get("/v1/models/{model}", response_model=Model, responses=errors(401, 404))
async def get_model(model: str, principal: Principal = Depends(authenticate), state: ServerState = Depends(get_state)):
    for m in _models(state):
        if m.id == model:
            return m
    raise not_found(f"model: {model!r} is not served here", "model_not_found", "model")
