"""Tenants: who a request belongs to, their share of the machine, and their limits."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmos.errors import InvalidRequestError
from llmos.validate import integer, number


@dataclass
class Tenant:
    name: str
    weight: float = 1.0
    kv_quota: int | None = None        # KV blocks this tenant's running sequences may hold
    max_waiting: int | None = None     # bound on requests queued but not yet started
    vtime: float = 0.0                 # virtual time: tokens served / weight (fair policy)
    group_vtime: dict[str | None, float] = field(default_factory=dict)   # the same per group inside it
    tokens_served: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0


class TenantTable:
    def __init__(self, default_max_waiting: int | None = None) -> None:
        self._tenants: dict[str, Tenant] = {}
        self.default_max_waiting = default_max_waiting

    def get(self, name: str) -> Tenant:
        t = self._tenants.get(name)
        if t is None:
            if not isinstance(name, str) or not name or len(name) > 128:
                raise InvalidRequestError(f"tenant: must be a non-empty string of at most 128 characters, got {name!r}")
            t = self._tenants[name] = Tenant(name, max_waiting=self.default_max_waiting)
        return t

    def set(self, name: str, weight: float | None = None, kv_quota: int | None = None,
            max_waiting: int | None = None) -> Tenant:
        t = self.get(name)
        if weight is not None:
            t.weight = float(number("weight", weight, 0, lo_open=True))
        if kv_quota is not None:
            t.kv_quota = integer("kv_quota", kv_quota, 1)
        if max_waiting is not None:
            t.max_waiting = integer("max_waiting", max_waiting, 0)
        return t

    def all(self) -> list[Tenant]:
        return list(self._tenants.values())
