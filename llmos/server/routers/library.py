"""The function library, storage and memory over HTTP, for people and programs with an API
key: the same tools, files, key-value store, semantic memory and conversations the agents
reach by system calls, scoped to the key's tenant (an HTTP client acts as pid 0: its
memory is the tenant's shared memory). Tool calls made here are audited like an agent's."""

from __future__ import annotations

import time
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from llmos.kernel.capabilities import ALL
from llmos.kernel.memory import SHARED
from llmos.kernel.syscall import error_record
from llmos.sampling_params import SamplingParams
from llmos.server.auth import Principal, authenticate, get_state
from llmos.server.errors import APIError
from llmos.server.routers.common import errors
from llmos.server.state import ServerState
from llmos.tools.registry import ToolContext

router = APIRouter(tags=["tools, storage and memory"])
_blocking = anyio.CapacityLimiter(256)


async def _run(fn, *args):
    return await anyio.to_thread.run_sync(fn, *args, limiter=_blocking)


def http_context(state: ServerState, tenant: str) -> ToolContext:
    """Who an HTTP client's tool call runs as: its tenant, no process, every capability
    (the key already decided what the caller may do)."""
    return state.agents.tool_context(tenant, 0, ALL)


def call_tool_audited(state: ServerState, tenant: str, name: str, args: dict, wait: float = 0.0) -> dict:
    audit = state.agents.audit
    rid = audit.begin(0, tenant, "tool.call", {"name": name, "args": args}, True)
    t0 = time.perf_counter()
    try:
        out = state.agents.library.call(http_context(state, tenant), name, args, wait=wait)
    except Exception as e:
        audit.finish(rid, error_record(e)["kind"], time.perf_counter() - t0)
        raise
    audit.finish(rid, "ok", time.perf_counter() - t0)
    return out


# -- tools ------------------------------------------------------------------------------------
class ToolCallRequest(BaseModel):
    arguments: dict[str, Any] = {}


class Decision(BaseModel):
    reason: str | None = Field(None, max_length=1000)


@router.get("/v1/tools", responses=errors(401))
async def list_tools(principal: Principal = Depends(authenticate), state: ServerState = Depends(get_state)) -> dict:
    """Every registered tool (built-in, from code and config modules, and from MCP servers)
    with its JSON schema; `function_name` is how a model names it in function calling."""
    tools = await _run(state.agents.library.tools)
    return {"object": "list", "data": [{**t.spec(), "function_name": t.function_name} for t in tools]}


@router.post("/v1/tools/{name}/call", responses=errors(400, 401, 403, 404, 424, 429))
async def call_tool(name: str, body: ToolCallRequest, principal: Principal = Depends(authenticate),
                    state: ServerState = Depends(get_state)) -> dict:
    """Run one tool for this key's tenant; a tool that needs approval is refused here
    (only agent processes wait for a person)."""
    out = await _run(call_tool_audited, state, principal.tenant, name, body.arguments)
    return {"name": name, "result": out["result"]}


@router.get("/v1/approvals", responses=errors(400, 401))
async def list_approvals(state_: str | None = Query(None, alias="state"), principal: Principal = Depends(authenticate),
                         state: ServerState = Depends(get_state)) -> dict:
    """Tool calls waiting for (or past) a person's decision; a tenant's key sees its own."""
    rows = await _run(lambda: state.agents.library.approvals.list(None if principal.admin else principal.tenant,
                                                                  state_))
    return {"object": "list", "data": [a.to_dict() for a in rows]}


@router.get("/v1/approvals/{id}", responses=errors(401, 404))
async def get_approval(id: str, principal: Principal = Depends(authenticate),
                       state: ServerState = Depends(get_state)) -> dict:
    return state.agents.library.approvals.get(id, None if principal.admin else principal.tenant).to_dict()


@router.post("/v1/approvals/{id}/{decision}", responses=errors(400, 401, 404, 409))
async def decide(id: str, decision: str, body: Decision | None = None, principal: Principal = Depends(authenticate),
                 state: ServerState = Depends(get_state)) -> dict:
    """approve or deny: the waiting process runs the call exactly once, or gets a refusal."""
    if decision not in ("approve", "deny"):
        raise APIError(404, f"decision: must be approve or deny, got {decision!r}", param="decision",
                       code="not_found")
    by = f"key:{principal.key.id}" if principal.key else "local"
    a = await _run(lambda: state.agents.library.approvals.decide(
        id, decision == "approve", by=by, reason=body.reason if body else None,
        tenant=None if principal.admin else principal.tenant))
    return a.to_dict()


# -- files and the key-value store ---------------------------------------------------------------
@router.get("/v1/fs", responses=errors(400, 401, 404))
async def fs_list(path: str = "", principal: Principal = Depends(authenticate),
                  state: ServerState = Depends(get_state)) -> dict:
    return {"path": path, "entries": await _run(state.agents.storage.list, principal.tenant, path)}


@router.get("/v1/fs/{path:path}", response_class=Response, responses=errors(400, 401, 404))
async def fs_cat(path: str, principal: Principal = Depends(authenticate),
                 state: ServerState = Depends(get_state)) -> Response:
    data = await _run(state.agents.storage.read, principal.tenant, path)
    return Response(data, media_type="application/octet-stream")


@router.put("/v1/fs/{path:path}", responses=errors(400, 401, 413))
async def fs_put(path: str, request: Request, principal: Principal = Depends(authenticate),
                 state: ServerState = Depends(get_state)) -> dict:
    data = await request.body()
    await _run(state.agents.storage.write, principal.tenant, path, data)
    return {"path": path, "bytes": len(data)}


@router.delete("/v1/fs/{path:path}", responses=errors(400, 401, 404))
async def fs_rm(path: str, principal: Principal = Depends(authenticate),
                state: ServerState = Depends(get_state)) -> dict:
    await _run(state.agents.storage.delete, principal.tenant, path)
    return {"path": path, "deleted": True}


class KVPut(BaseModel):
    value: Any = None
    if_version: int | None = Field(None, ge=0)


@router.get("/v1/kv", responses=errors(400, 401))
async def kv_list(prefix: str = "", principal: Principal = Depends(authenticate),
                  state: ServerState = Depends(get_state)) -> dict:
    return {"object": "list", "data": await _run(state.agents.kv.list, principal.tenant, prefix)}


@router.get("/v1/kv/{key:path}", responses=errors(400, 401, 404))
async def kv_get(key: str, principal: Principal = Depends(authenticate),
                 state: ServerState = Depends(get_state)) -> dict:
    item = await _run(state.agents.kv.get, principal.tenant, key)
    if item is None:
        raise APIError(404, f"key: no key {key!r}", param="key", code="not_found")
    return {"key": key, **item}


@router.put("/v1/kv/{key:path}", responses=errors(400, 401, 404, 409, 413))
async def kv_put(key: str, body: KVPut, principal: Principal = Depends(authenticate),
                 state: ServerState = Depends(get_state)) -> dict:
    version = await _run(state.agents.kv.put, principal.tenant, key, body.value, body.if_version)
    return {"key": key, "version": version}


@router.delete("/v1/kv/{key:path}", responses=errors(400, 401))
async def kv_delete(key: str, principal: Principal = Depends(authenticate),
                    state: ServerState = Depends(get_state)) -> dict:
    return {"key": key, "deleted": await _run(state.agents.kv.delete, principal.tenant, key)}


# -- semantic memory ------------------------------------------------------------------------------
class RememberRequest(BaseModel):
    text: str
    metadata: dict[str, Any] | None = None


class RecallRequest(BaseModel):
    query: str
    k: int = Field(5, ge=1, le=100)
    filter: dict[str, Any] | None = None


@router.post("/v1/memory", status_code=201, responses=errors(400, 401, 413))
async def remember(body: RememberRequest, principal: Principal = Depends(authenticate),
                   state: ServerState = Depends(get_state)) -> dict:
    """Store a fact in the tenant's shared memory (what its agents with mem:shared see)."""
    mid = await _run(state.agents.memory.remember, principal.tenant, SHARED, body.text, body.metadata)
    return {"id": mid}


@router.post("/v1/memory/recall", responses=errors(400, 401))
async def recall(body: RecallRequest, principal: Principal = Depends(authenticate),
                 state: ServerState = Depends(get_state)) -> dict:
    items = await _run(lambda: state.agents.memory.recall(principal.tenant, [SHARED], body.query, body.k,
                                                          body.filter))
    return {"object": "list", "data": [{"id": m.id, "text": m.text, "score": m.score, "metadata": m.metadata,
                                        "created_at": m.created_at} for m in items]}


@router.delete("/v1/memory/{id}", responses=errors(400, 401))
async def forget(id: str, principal: Principal = Depends(authenticate),
                 state: ServerState = Depends(get_state)) -> dict:
    return {"id": id, "deleted": await _run(state.agents.memory.forget, principal.tenant, [SHARED], id)}


# -- conversations -----------------------------------------------------------------------------------
class ConversationCreate(BaseModel):
    name: str
    system: str = "You are a helpful assistant."
    budget: int | None = Field(None, ge=128, le=1 << 20)


class ConversationMessage(BaseModel):
    content: str
    max_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = None


@router.post("/v1/conversations", status_code=201, responses=errors(400, 401))
async def create_conversation(body: ConversationCreate, principal: Principal = Depends(authenticate),
                              state: ServerState = Depends(get_state)) -> dict:
    """A conversation the server keeps, however long it runs: it holds a working context
    within `budget` tokens, pages older turns to memory and recalls them by relevance."""
    conv = await _run(lambda: state.agents.conversations.create(principal.tenant, body.name, body.system,
                                                                body.budget))
    return conv.to_dict()


@router.get("/v1/conversations", responses=errors(401))
async def list_conversations(principal: Principal = Depends(authenticate),
                             state: ServerState = Depends(get_state)) -> dict:
    return {"object": "list", "data": await _run(state.agents.conversations.list, principal.tenant)}


@router.get("/v1/conversations/{name}", responses=errors(400, 401))
async def get_conversation(name: str, principal: Principal = Depends(authenticate),
                           state: ServerState = Depends(get_state)) -> dict:
    return (await _run(state.agents.conversations.get, principal.tenant, name)).to_dict()


@router.delete("/v1/conversations/{name}", responses=errors(400, 401))
async def delete_conversation(name: str, principal: Principal = Depends(authenticate),
                              state: ServerState = Depends(get_state)) -> dict:
    return {"name": name, "deleted": await _run(state.agents.conversations.delete, principal.tenant, name)}


@router.post("/v1/conversations/{name}/messages", responses=errors(400, 401, 413, 429))
async def converse(name: str, body: ConversationMessage, principal: Principal = Depends(authenticate),
                   state: ServerState = Depends(get_state)) -> dict:
    """One turn: the user's message in, the assistant's reply out, with what was recalled."""
    sampling = {k: v for k, v in (("max_tokens", body.max_tokens), ("temperature", body.temperature),
                                  ("seed", body.seed)) if v is not None}
    sampling.setdefault("max_tokens", min(state.settings.server.default_max_tokens, 128))

    def generate(messages, params):
        out = state.llm.submit(messages, SamplingParams(**params), tenant=principal.tenant,
                               priority=principal.default_priority).result()
        return {"text": out.text, "finish_reason": out.finish_reason, "prompt_tokens": len(out.prompt_token_ids),
                "output_tokens": len(out.token_ids)}

    return await _run(lambda: state.agents.conversations.send(principal.tenant, name, body.content,
                                                              generate=generate, sampling=sampling))
