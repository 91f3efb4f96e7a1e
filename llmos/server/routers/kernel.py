"""The kernel API under /v1/kernel: list the requests the kernel holds, cancel, suspend,
resume or renice one, read the kernel's stats. An admin key reaches every tenant's
requests; any other key only its own tenant's, and others' do not exist for it (404)."""

from __future__ import annotations

import dataclasses

import anyio
from fastapi import APIRouter, Depends

from llmos.api.handle import RequestHandle
from llmos.server.auth import Principal, authenticate, get_state
from llmos.server.errors import not_found
from llmos.server.routers.common import errors
from llmos.server.schemas.kernel import ActionResult, KernelRequest, KernelRequestList, KernelStats, Renice
from llmos.server.state import ServerState

router = APIRouter(prefix="/v1/kernel", tags=["kernel"])


async def _visible(state: ServerState, principal: Principal) -> list[KernelRequest]:
    rows = await anyio.to_thread.run_sync(state.llm.list_requests)
    return [KernelRequest(**dataclasses.asdict(r)) for r in rows if principal.may_see(r.tenant)]


def _owned(state: ServerState, principal: Principal, request_id: str) -> RequestHandle:
    handle = state.llm.request(request_id)
    if handle is None or not principal.may_see(handle.tenant):
        raise not_found(f"request_id: no running request {request_id!r}", "request_not_found", "request_id")
    return handle


@router.get("/requests", response_model=KernelRequestList, responses=errors(400, 401))
async def list_requests(tenant: str | None = None, principal: Principal = Depends(authenticate),
                        state: ServerState = Depends(get_state)):
    """Requests in the kernel: tenant, priority, state, tokens so far, KV blocks held."""
    rows = await _visible(state, principal)
    return KernelRequestList(data=[r for r in rows if tenant is None or r.tenant == tenant])


@router.get("/requests/{request_id}", response_model=KernelRequest, responses=errors(400, 401, 404))
async def get_request(request_id: str, principal: Principal = Depends(authenticate),
                      state: ServerState = Depends(get_state)):
    for r in await _visible(state, principal):
        if r.request_id == request_id:
            return r
    raise not_found(f"request_id: no running request {request_id!r}", "request_not_found", "request_id")


async def _act(state: ServerState, principal: Principal, request_id: str, action: str, fn) -> ActionResult:
    handle = _owned(state, principal, request_id)
    ok = await anyio.to_thread.run_sync(fn, handle)
    return ActionResult(request_id=request_id, action=action, ok=bool(ok), state=handle.status)


@router.post("/requests/{request_id}/cancel", response_model=ActionResult, responses=errors(400, 401, 404))
async def cancel(request_id: str, principal: Principal = Depends(authenticate),
                 state: ServerState = Depends(get_state)):
    """End the request now; its KV blocks go back to the pool and its client sees finish_reason "abort"."""
    return await _act(state, principal, request_id, "cancel", lambda h: h.cancel())


@router.post("/requests/{request_id}/suspend", response_model=ActionResult, responses=errors(400, 401, 404))
async def suspend(request_id: str, principal: Principal = Depends(authenticate),
                  state: ServerState = Depends(get_state)):
    """Pause the request; it holds no KV blocks while suspended and continues exactly where it was on resume."""
    return await _act(state, principal, request_id, "suspend", lambda h: h.suspend())


@router.post("/requests/{request_id}/resume", response_model=ActionResult, responses=errors(400, 401, 404))
async def resume(request_id: str, principal: Principal = Depends(authenticate),
                 state: ServerState = Depends(get_state)):
    return await _act(state, principal, request_id, "resume", lambda h: h.resume())


@router.post("/requests/{request_id}/priority", response_model=ActionResult, responses=errors(400, 401, 403, 404))
async def renice(request_id: str, body: Renice, principal: Principal = Depends(authenticate),
                 state: ServerState = Depends(get_state)):
    """Change a request's priority (lower runs first), within what the caller's key allows."""
    priority = principal.priority(body.priority)
    return await _act(state, principal, request_id, "renice", lambda h: h.set_priority(priority))


@router.get("/stats", response_model=KernelStats, responses=errors(401))
async def stats(principal: Principal = Depends(authenticate), state: ServerState = Depends(get_state)):
    s = await anyio.to_thread.run_sync(state.llm.stats)
    out = (s if principal.admin else s.for_tenant(principal.tenant)).to_dict()
    if state.agents is not None:
        out["agents"] = state.agents.confinement_summary()
    return out
