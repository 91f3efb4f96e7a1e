"""Bodies of the kernel API: the requests the kernel holds, actions on them, its stats."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class KernelRequest(BaseModel):
    request_id: str
    tenant: str
    priority: int
    state: str = Field(description="waiting, running, swapped, suspended or finished")
    prompt_tokens: int
    output_tokens: int = Field(description="tokens generated so far")
    kv_blocks: int = Field(description="KV cache blocks held now")
    owner_pid: int | None = Field(None, description="the agent process that made it, if any")
    user: str | None = None
    created: int | None = None
    waiting_s: float = Field(0.0, description="seconds spent queued (waiting or swapped out) so far")
    adapter: str | None = Field(None, description="the LoRA adapter it runs through, if any")
    replica: int | None = Field(None, description="in a cluster (`llmos serve --cluster`), the engine replica "
                                                  "that holds it; none while the router still queues it")


class KernelRequestList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KernelRequest]


class Renice(BaseModel):
    priority: int = Field(ge=-1000, le=1000, description="lower runs first; no lower than the key allows")


class ActionResult(BaseModel):
    request_id: str
    action: Literal["cancel", "suspend", "resume", "renice"]
    ok: bool = Field(description="false when the request was already in (or past) the asked-for state")
    state: str


class KernelStats(BaseModel):
    """LLM.stats(); a non-admin key sees only its own tenant in the per-tenant parts."""
    model_config = ConfigDict(extra="allow")
    requests: dict[str, int]
    requests_by_tenant: dict[str, dict[str, int]]
    tenants: dict[str, dict[str, Any]]
    histograms: dict[str, dict[str, Any]]


class Health(BaseModel):
    status: Literal["ok", "ready", "draining"]
