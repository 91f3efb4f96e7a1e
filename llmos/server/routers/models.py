"""GET /v1/models: the generation model and the embedding model this server runs, and
the LoRA adapters loaded on the generation model (BASE:NAME) that the caller may use."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends

from llmos.server.auth import Principal, authenticate, get_state
from llmos.server.errors import not_found
from llmos.server.routers.adapters import visible
from llmos.server.routers.common import adapter_model_id, errors
from llmos.server.schemas.openai import Model, ModelList
from llmos.server.state import ServerState

router = APIRouter(tags=["openai"])


async def _models(state: ServerState, principal: Principal) -> list[Model]:
    rows = await anyio.to_thread.run_sync(state.llm.list_adapters)
    adapters = [Model(id=adapter_model_id(state, a.name), created=int(a.loaded_at))
                for a in rows if visible(a, principal)]
    return [Model(id=state.model_name, created=state.started), Model(id=state.embedder.name, created=state.started),
            *adapters]


@router.get("/v1/models", response_model=ModelList, responses=errors(401))
async def list_models(principal: Principal = Depends(authenticate), state: ServerState = Depends(get_state)):
    return ModelList(data=await _models(state, principal))


@router.get("/v1/models/{model}", response_model=Model, responses=errors(401, 404))
async def get_model(model: str, principal: Principal = Depends(authenticate), state: ServerState = Depends(get_state)):
    for m in await _models(state, principal):
        if m.id == model:
            return m
    raise not_found(f"model: {model!r} is not served here", "model_not_found", "model")
