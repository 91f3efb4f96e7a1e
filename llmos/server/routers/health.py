"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from llmos.server.auth import Principal, get_state, require_admin
from llmos.server.metrics import render
from llmos.server.routers.common import errors
from llmos.server.schemas.kernel import Health
from llmos.server.state import ServerState

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
async def health():
    """The process is up and serving HTTP (true while draining too)."""
    return Health(status="ok")


@router.get("/ready", response_model=Health, responses={503: {"model": Health}})
async def ready(state: ServerState = Depends(get_state)):
    """Whether to send this instance new requests: 503 while it drains for shutdown."""
    if state.drain.draining:
        return JSONResponse(Health(status="draining").model_dump(), status_code=503)
    return Health(status="ready")


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **errors(401, 403)})
async def metrics(principal: Principal = Depends(require_admin), state: ServerState = Depends(get_state)):
    """Prometheus text format; needs an admin key, since it names every tenant."""
    body = await anyio.to_thread.run_sync(render, state)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
