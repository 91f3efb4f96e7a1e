"""Agents over HTTP. `/v1/processes`, `/v1/messages`, `/v1/topics` and `/v1/audit` are for
people and programs holding an API key: a tenant's key sees and steers only its tenant's
processes, an admin key all of them. `/v1/sys` is the system call gate for the agents
themselves, authenticated by the per-process token their supervisor handed them."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field

from llmos.kernel.process import Process
from llmos.server.auth import Principal, authenticate, authenticate_process, get_state, require_admin
from llmos.server.errors import APIError
from llmos.server.routers.common import errors
from llmos.server.state import ServerState

router = APIRouter(tags=["agents"])
sys_router = APIRouter(tags=["system calls"])

# Blocking calls (recv, wait, llm) each hold a worker thread for up to 20 s.
_blocking = anyio.CapacityLimiter(512)


async def _run(fn, *args):
    return await anyio.to_thread.run_sync(fn, *args, limiter=_blocking)


class SpawnRequest(BaseModel):
    path: str = Field(description="the agent's .py file in the tenant's storage (relative); admin keys only: an "
                                  "absolute host path or package.module:function")
    name: str | None = None
    caps: list[str] | None = Field(None, description="capabilities; omitted: all")
    args: list[str] = []
    cwd: str | None = Field(None, description="admin keys only: the working directory (bound in read-only)")
    priority: int | None = Field(None, ge=-1000, le=1000)
    weight: float = Field(1.0, gt=0, le=1e6)
    restart: Literal["never", "on-failure", "always"] = "never"
    durable: bool = False
    limits: dict[str, Any] = {}


class ReniceRequest(BaseModel):
    priority: int = Field(ge=-1000, le=1000)
    weight: float | None = Field(None, gt=0, le=1e6)


class MessageRequest(BaseModel):
    to: int | str
    body: Any = None
    tenant: str | None = Field(None, description="admin only: the tenant whose process receives it")


class PublishRequest(BaseModel):
    body: Any = None


class Syscall(BaseModel):
    call: str
    args: dict[str, Any] = {}
    seq: int | None = Field(None, ge=0, description="the call's number since the process started (durable replay)")


def _visible(state: ServerState, principal: Principal, pid: int) -> Process:
    proc = state.agents.table.get(pid)
    if proc is None or not principal.may_see(proc.tenant):
        raise APIError(404, f"pid: no process {pid}", param="pid", code="process_not_found")
    return proc


@router.post("/v1/processes", status_code=201, responses=errors(400, 401, 403, 404, 409, 503))
async def spawn(body: SpawnRequest, principal: Principal = Depends(authenticate),
                state: ServerState = Depends(get_state)) -> dict:
    """Start an agent as an OS process; returns its process table row (with `pid`)."""
    priority = principal.priority(body.priority)
    await anyio.to_thread.run_sync(state.set_weight, principal.tenant, principal.weight)
    proc = await _run(lambda: state.agents.spawn(
        tenant=principal.tenant, path=body.path, args=body.args, cwd=body.cwd, name=body.name, caps=body.caps,
        limits=body.limits, priority=priority, weight=body.weight, restart=body.restart, durable=body.durable,
        key_id=principal.key.id if principal.key else None, admin=principal.admin))
    return proc.to_dict()


@router.get("/v1/processes", responses=errors(400, 401))
async def list_processes(all: bool = False, principal: Principal = Depends(authenticate),
                         state: ServerState = Depends(get_state)) -> dict:
    rows = state.agents.table.list(None if principal.admin else principal.tenant, include_exited=all)
    depths = await _run(state.agents.ipc.depths)
    return {"object": "list", "data": [{**p.to_dict(), "mailbox_depth": depths.get((p.tenant, p.name), 0)}
                                       for p in rows]}


@router.get("/v1/processes/{pid}", responses=errors(400, 401, 404))
async def get_process(pid: int, principal: Principal = Depends(authenticate),
                      state: ServerState = Depends(get_state)) -> dict:
    return _visible(state, principal, pid).to_dict()


@router.post("/v1/processes/{pid}/renice", responses=errors(400, 401, 403, 404))
async def renice(pid: int, body: ReniceRequest, principal: Principal = Depends(authenticate),
                 state: ServerState = Depends(get_state)) -> dict:
    _visible(state, principal, pid)
    priority = principal.priority(body.priority)
    ok = await _run(state.agents.renice, pid, priority, body.weight)
    p = state.agents.table.get(pid)
    return {"pid": pid, "action": "renice", "ok": bool(ok), "state": p.state.value, "priority": p.priority,
            "weight": p.weight}


@router.post("/v1/processes/{pid}/{action}", responses=errors(400, 401, 404))
async def act(pid: int, action: Literal["kill", "suspend", "resume"], principal: Principal = Depends(authenticate),
              state: ServerState = Depends(get_state)) -> dict:
    """kill: SIGTERM, then SIGKILL after the grace period, children too, LLM requests cancelled.
    suspend: SIGSTOP, and its LLM requests leave the KV pool. resume: the reverse."""
    _visible(state, principal, pid)
    ok = await _run(getattr(state.agents.supervisor, action), pid)
    return {"pid": pid, "action": action, "ok": bool(ok), "state": state.agents.table.get(pid).state.value}


@router.get("/v1/processes/{pid}/wait", responses=errors(400, 401, 404))
async def wait(pid: int, timeout: float = Query(20.0, ge=0, le=20.0), principal: Principal = Depends(authenticate),
               state: ServerState = Depends(get_state)) -> dict:
    """Long poll: returns when the process has ended for good, or after `timeout` seconds."""
    _visible(state, principal, pid)
    code = await _run(lambda: state.agents.supervisor.wait(pid, timeout=timeout))
    p = state.agents.table.get(pid)
    done = not p.state.live
    return {"pid": pid, "state": p.state.value, "exit_code": code if done else None, "done": done,
            "reason": p.reason}


@router.get("/v1/processes/{pid}/logs", response_class=Response, responses=errors(400, 401, 404))
async def logs(pid: int, offset: int = Query(0, ge=0), principal: Principal = Depends(authenticate),
               state: ServerState = Depends(get_state)) -> Response:
    """The process's stdout and stderr (capped); `offset` skips what a follower already has."""
    _visible(state, principal, pid)
    data = await anyio.to_thread.run_sync(state.agents.supervisor.read_log, pid)
    return Response(data[offset:], media_type="text/plain", headers={"X-Log-Size": str(len(data))})


def _tenant_for(principal: Principal, tenant: str | None) -> str:
    if tenant is not None and tenant != principal.tenant and not principal.admin:
        raise APIError(403, "tenant: only an admin key may address another tenant", "permission_error",
                       param="tenant", code="permission_denied")
    return tenant or principal.tenant


@router.post("/v1/messages", responses=errors(400, 401, 403, 404, 413, 429))
async def send(body: MessageRequest, principal: Principal = Depends(authenticate),
               state: ServerState = Depends(get_state)) -> dict:
    """Send a message (from no process) to a process's mailbox, by pid or name."""
    tenant = _tenant_for(principal, body.tenant)
    mailbox = state.agents.resolve(tenant, body.to)
    mid = await _run(lambda: state.agents.ipc.send(tenant, mailbox, body.body, sender_name="user"))
    return {"id": mid, "to": mailbox}


@router.get("/v1/messages/dead", responses=errors(400, 401))
async def dead_letters(limit: int = Query(100, ge=1, le=1000), principal: Principal = Depends(authenticate),
                       state: ServerState = Depends(get_state)) -> dict:
    """Messages that could not be delivered (their receiver never came back, or was full)."""
    rows = state.agents.ipc.dead_letters(None if principal.admin else principal.tenant, limit)
    return {"object": "list", "data": [dataclasses.asdict(m) for m in rows]}


@router.get("/v1/topics/{topic}", responses=errors(400, 401))
async def topic(topic: str, tenant: str | None = None, principal: Principal = Depends(authenticate),
                state: ServerState = Depends(get_state)) -> dict:
    t = _tenant_for(principal, tenant)
    return {"topic": topic, "tenant": t, "subscribers": state.agents.ipc.subscribers(t, topic)}


@router.post("/v1/topics/{topic}/publish", responses=errors(400, 401, 403, 413))
async def publish(topic: str, body: PublishRequest, tenant: str | None = None,
                  principal: Principal = Depends(authenticate), state: ServerState = Depends(get_state)) -> dict:
    t = _tenant_for(principal, tenant)
    n = await _run(lambda: state.agents.ipc.publish(t, topic, body.body, sender_name="user"))
    return {"topic": topic, "delivered": n}


@router.get("/v1/audit", responses=errors(400, 401))
async def audit(pid: int | None = None, denied: bool | None = None, call: str | None = None,
                limit: int = Query(1000, ge=1, le=100000), principal: Principal = Depends(authenticate),
                state: ServerState = Depends(get_state)) -> dict:
    """System calls as the audit log recorded them, oldest first (the newest `limit`)."""
    rows = await anyio.to_thread.run_sync(lambda: state.agents.audit.query(
        pid=pid, tenant=None if principal.admin else principal.tenant, denied=denied, call=call, limit=limit))
    return {"object": "list", "data": [dataclasses.asdict(r) for r in rows]}


@router.get("/v1/audit/verify", responses=errors(400, 401, 403))
async def verify(principal: Principal = Depends(require_admin), state: ServerState = Depends(get_state)) -> dict:
    """Check the audit log's hash chain and hold it to its signed head: names the first record
    altered or removed, newest rows cut off included."""
    return dataclasses.asdict(await anyio.to_thread.run_sync(state.agents.audit.verify))


@sys_router.post("/v1/sys", responses=errors(400, 401, 403, 404, 409, 413, 429))
async def syscall(body: Syscall, proc: Process = Depends(authenticate_process),
                  state: ServerState = Depends(get_state)) -> dict:
    """One system call of an agent process: {"call": "fs.write", "args": {...}, "seq": n}."""
    result = await _run(state.agents.syscalls.call, proc, body.call, body.args, body.seq)
    return {"result": result}
