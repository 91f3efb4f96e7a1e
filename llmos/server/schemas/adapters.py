"""Bodies of /v1/adapters: the LoRA adapters the server holds, loading and unloading them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class AdapterLoad(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                      description="what requests call it: model BASE:NAME (or NAME)")
    path: str = Field(min_length=1, max_length=4096,
                      description="on the server: a PEFT adapter directory (adapter_config.json + "
                                  "adapter_model.safetensors) or a GGUF LoRA file")
    tenants: list[str] | None = Field(None, description="tenants that may use it; absent: every tenant")


class Adapter(BaseModel):
    id: str = Field(description="its model id: BASE:NAME")
    object: Literal["adapter"] = "adapter"
    name: str
    format: Literal["peft", "gguf"]
    rank: int
    alpha: float
    targets: list[str]
    bytes: int = Field(description="engine memory its weights hold while resident")
    resident: bool = Field(description="false once evicted (idle, least recently used); the next request "
                                       "that names it reads it back from its file")
    active_requests: int
    loaded_at: int
    loads: int = Field(description="times made resident: 1 + reloads after eviction")
    path: str | None = Field(None, description="admin keys only")
    tenants: list[str] | None = Field(None, description="admin keys only; absent: every tenant")


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Adapter]
    memory_budget: int | None = Field(None, description="adapter_memory in bytes (admin keys only)")
    memory_used: int | None = Field(None, description="bytes resident adapters hold (admin keys only)")


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True
