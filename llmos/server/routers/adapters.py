"""/v1/adapters: the LoRA adapters this server serves beside its base model. Every key
sees the adapters its tenant may use; admin keys load and unload them and see all."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends

from llmos.errors import ModelLoadError
from llmos.kernel.adapters import AdapterInfo
from llmos.server.auth import Principal, authenticate, get_state, require_admin
from llmos.server.errors import APIError, not_found
from llmos.server.routers.common import adapter_model_id, errors
from llmos.server.schemas.adapters import Adapter, AdapterDeleted, AdapterList, AdapterLoad
from llmos.server.state import ServerState

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


def visible(info: AdapterInfo, principal: Principal) -> bool:
    return principal.admin or info.tenants is None or principal.tenant in info.tenants


def _body(state: ServerState, info: AdapterInfo, principal: Principal) -> Adapter:
    admin = principal.admin
    return Adapter(id=adapter_model_id(state, info.name), name=info.name, format=info.format, rank=info.rank,
                   alpha=info.alpha, targets=info.targets, bytes=info.bytes, resident=info.resident,
                   active_requests=info.active_requests, loaded_at=int(info.loaded_at), loads=info.loads,
                   path=info.path if admin else None, tenants=info.tenants if admin else None)


def _missing(name: str) -> APIError:
    return not_found(f"adapter: no adapter named {name!r} is loaded", "adapter_not_found", "adapter")


@router.get("", response_model=AdapterList, responses=errors(401))
async def list_adapters(principal: Principal = Depends(authenticate), state: ServerState = Depends(get_state)):
    rows = await anyio.to_thread.run_sync(state.llm.list_adapters)
    data = [_body(state, a, principal) for a in rows if visible(a, principal)]
    if not principal.admin:
        return AdapterList(data=data)
    return AdapterList(data=data, memory_budget=state.llm.config.adapter_memory,
                       memory_used=sum(a.bytes for a in rows if a.resident))


@router.get("/{name}", response_model=Adapter, responses=errors(401, 404))
async def get_adapter(name: str, principal: Principal = Depends(authenticate),
                      state: ServerState = Depends(get_state)):
    info = state.llm.adapter(name)
    if info is None or not visible(info, principal):
        raise _missing(name)
    return _body(state, info, principal)


@router.post("", response_model=Adapter, responses=errors(400, 401, 403, 409, 429))
async def load_adapter(body: AdapterLoad, principal: Principal = Depends(require_admin),
                       state: ServerState = Depends(get_state)):
    """Read an adapter from a path on the server and make it resident (admin)."""
    if state.llm.adapter(body.name) is not None:
        raise APIError(409, f"name: adapter {body.name!r} is already loaded; unload it first", param="name",
                       code="adapter_exists")
    try:
        info = await anyio.to_thread.run_sync(lambda: state.llm.load_adapter(body.name, body.path,
                                                                             tenants=body.tenants))
    except ModelLoadError as e:
        raise APIError(400, f"path: {e}", param="path", code="invalid_adapter") from None
    return _body(state, info, principal)


@router.delete("/{name}", response_model=AdapterDeleted, responses=errors(401, 403, 404, 409))
async def unload_adapter(name: str, principal: Principal = Depends(require_admin),
                         state: ServerState = Depends(get_state)):
    """Forget an adapter (admin); refused (409) while requests use it."""
    if state.llm.adapter(name) is None:
        raise _missing(name)
    await anyio.to_thread.run_sync(state.llm.unload_adapter, name)
    return AdapterDeleted(id=adapter_model_id(state, name))
