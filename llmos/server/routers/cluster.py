"""The cluster API (`llmos serve --cluster`): each replica's state and load, the router's
counters, and scaling while serving. Admin keys only: it describes the whole machine."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from llmos.server.auth import Principal, get_state, require_admin
from llmos.server.errors import APIError
from llmos.server.routers.common import errors
from llmos.server.state import ServerState

router = APIRouter(prefix="/v1/cluster", tags=["cluster"])


class Scale(BaseModel):
    replicas: int = Field(ge=1, le=1024, description="engine replicas to run from now on")
    timeout: float = Field(60.0, ge=0, le=3600, description="seconds removed replicas may take to finish their "
                                                            "requests before those move to the others")


def _cluster(state: ServerState):
    if not hasattr(state.llm, "replicas"):
        raise APIError(409, "this server runs one engine; start it with `llmos serve --cluster` to use the cluster API",
                       "invalid_request_error", code="not_a_cluster")
    return state.llm


async def _status(llm) -> dict:
    rows = await anyio.to_thread.run_sync(llm.replicas)
    stats = await anyio.to_thread.run_sync(llm.replica_stats)
    for r in rows:
        s = stats.get(r["index"])
        r["stats"] = None if s is None else {"requests": s.requests, "tokens": {"prompt": s.tokens.prompt,
                                                                                "generated": s.tokens.generated},
                                             "prefix_cache": {"queries": s.prefix_cache.queries,
                                                              "hits": s.prefix_cache.hits}}
    return {"object": "cluster", "replicas": rows, "routing": llm.routing_stats()}


@router.get("", responses=errors(401, 403, 409))
async def status(principal: Principal = Depends(require_admin), state: ServerState = Depends(get_state)) -> dict:
    """Every replica: index, process, node, up/down/draining, load, restarts, recovery times, its own stats."""
    return await _status(_cluster(state))


@router.post("/scale", responses=errors(400, 401, 403, 409))
async def scale(body: Scale, principal: Principal = Depends(require_admin),
                state: ServerState = Depends(get_state)) -> dict:
    """Add replicas, or drain and remove the newest ones, while serving."""
    llm = _cluster(state)
    await anyio.to_thread.run_sync(lambda: llm.scale(body.replicas, timeout=body.timeout))
    return await _status(llm)
