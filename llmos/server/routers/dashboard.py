"""The web dashboard: the single-page app at `/` and its assets, who the key is, and the
live feed of monitor samples (server-sent events) that the dashboard and `llmos top` read.
A browser's EventSource cannot send an Authorization header, so the dashboard reads the
feed with fetch(); the key never appears in a URL or a server log."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, Field
from starlette.responses import StreamingResponse

import llmos
from llmos.server.auth import Principal, authenticate, bearer, get_state
from llmos.server.errors import not_found
from llmos.server.routers.common import errors
from llmos.server.state import ServerState

STATIC = Path(__file__).resolve().parent.parent / "static" / "dashboard"

router = APIRouter(tags=["dashboard"])


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class WhoAmI(BaseModel):
    auth: bool = Field(description="whether the server asks for API keys")
    tenant: str | None = Field(description="the key's tenant; null when auth is on and no key was sent")
    admin: bool
    min_priority: int | None = Field(None, description="the most urgent priority the key may ask for")
    model: str
    models: list[str]
    version: str


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index():
    return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/dashboard/static/{name:path}", include_in_schema=False)
async def asset(name: str):
    path = (STATIC / name).resolve()
    if not path.is_relative_to(STATIC) or not path.is_file():
        raise not_found(f"no dashboard asset {name!r}", "asset_not_found", "name")
    return FileResponse(path, headers={"Cache-Control": "no-cache"})


@router.get("/v1/dashboard/whoami", response_model=WhoAmI, responses=errors(401))
async def whoami(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                 state: ServerState = Depends(get_state)):
    """The caller's tenant and rights, and the models served: what the dashboard's sign-in
    checks. Without a key it answers whether one is needed (a wrong key is still a 401)."""
    auth = state.settings.server.auth
    if auth and (credentials is None or not credentials.credentials.strip()):
        return WhoAmI(auth=True, tenant=None, admin=False, model=state.model_name, models=state.served_models(),
                      version=llmos.__version__)
    principal = authenticate(request, credentials, state)
    return WhoAmI(auth=auth, tenant=principal.tenant, admin=principal.admin,
                  min_priority=None if principal.admin else principal.min_priority, model=state.model_name,
                  models=state.served_models(), version=llmos.__version__)


@router.get("/v1/dashboard/snapshot", responses=errors(401))
async def snapshot(principal: Principal = Depends(authenticate), state: ServerState = Depends(get_state)):
    """The next monitor sample with request rows and the memory map, as this key may see it
    (what `llmos top --once` prints)."""
    monitor = state.monitor
    monitor.watchers += 1
    try:
        version = monitor.version
        while True:
            version, sample = await monitor.next_sample(version, timeout=5 * monitor.interval)
            if sample is None or "rows" in sample:
                break
    finally:
        monitor.watchers -= 1
    if sample is None:
        sample = monitor.latest or {}
    return monitor.view(sample, principal.tenant, principal.admin)


@router.get("/v1/dashboard/feed", response_class=StreamingResponse, include_in_schema=False)
async def feed(request: Request, principal: Principal = Depends(authenticate),
               state: ServerState = Depends(get_state)):
    """Server-sent events: `hello` with the interval and the recent history, then a
    `sample` every interval, each cut to what this key may see."""
    monitor = state.monitor
    scope = None if principal.admin else principal.tenant      # who sees the same sample

    async def stream():
        monitor.watchers += 1
        try:
            history = [monitor.view(s, principal.tenant, principal.admin) for s in list(monitor.history)]
            yield _event("hello", {"interval": monitor.interval, "history": history})
            version = monitor.version
            while not state.drain.draining and not await request.is_disconnected():
                version, sample = await monitor.next_sample(version, timeout=15.0)
                if sample is None:
                    yield ": keep-alive\n\n"
                    continue
                yield monitor.encoded(version, scope, lambda: _event("sample", monitor.view(
                    sample, principal.tenant, principal.admin)))
        finally:
            monitor.watchers -= 1

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
