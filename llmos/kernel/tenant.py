"""Tenants: who a request belongs to, their share of the machine, and their limits."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from llmos.errors import InvalidRequestError


@dataclass
class Tenant:
    name: str
    weight: float = 1.0
    kv_quota: int | None = None        # KV blocks this tenant's running sequences may hold
    max_waiting: int | None = None     # bound on requests queued but not yet started
    vtime: float = 0.0                 # virtual time: tokens served / weight (fair policy)
    tokens_served: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    num_waiting: int = 0               # admitted to the queue, not yet finished or started
    num_active: int = 0                # all unfinished requests


class TenantTable:
    def __init__(self, default_max_waiting: int | None = None) -> None:
        self._tenants: dict[str, Tenant] = {}
        self.default_max_waiting = default_max_waiting
        self.lock = threading.Lock()

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
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise InvalidRequestError(f"weight: must be a positive number, got {weight!r}")
            t.weight = float(weight)
        if kv_quota is not None:
            if isinstance(kv_quota, bool) or not isinstance(kv_quota, int) or kv_quota < 1:
                raise InvalidRequestError(f"kv_quota: must be a positive number of blocks, got {kv_quota!r}")
            t.kv_quota = kv_quota
        if max_waiting is not None:
            if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
                raise InvalidRequestError(f"max_waiting: must be a non-negative integer, got {max_waiting!r}")
            t.max_waiting = max_waiting
        return t

    def all(self) -> list[Tenant]:
        return list(self._tenants.values())
