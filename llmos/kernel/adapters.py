"""LoRA adapters as memory the kernel manages.

An adapter is registered once (a name, the file it comes from, who may use it) and is
then resident in the engine's memory or not, as a page is in RAM or on disk. Resident
adapters share a budget in bytes and a bound on their number; when a load would go past
either, the least recently used idle adapters are evicted (their weights dropped, their
registration kept), and a later request that names one brings it back from its file.
An adapter a live request uses is never evicted nor unloaded.

Requests name an adapter; the kernel checks the tenant may use it and counts the request
as a user from admission to finish. Each registration gets a unique id, which seeds the
prefix cache's hashes, so KV computed under one adapter is never reused under another
(nor under a different adapter later loaded under the same name).
"""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass, field

from llmos.errors import InvalidRequestError, LLMOSError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class NoSuchAdapter(LLMOSError):
    """No adapter is registered under this name."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"adapter: no adapter named {name!r} is loaded"
                         + (f" (loaded: {', '.join(sorted(known))})" if known else ""))
        self.param = "adapter"


class AdapterNotAllowed(LLMOSError):
    """The request's tenant is not among those the adapter was loaded for."""

    def __init__(self, name: str, tenant: str) -> None:
        super().__init__(f"adapter: tenant {tenant!r} may not use adapter {name!r}")
        self.param = "adapter"


class AdapterBusy(LLMOSError):
    """The adapter is in use by live requests, so it cannot be unloaded now."""


class AdapterMemoryFull(LLMOSError):
    """The adapters in use fill the adapter memory; retry when some of their requests end."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidRequestError(f"adapter: a name is 1-64 letters, digits, '.', '_' or '-', starting with a "
                                  f"letter or digit; got {name!r:.80}")
    return name


@dataclass
class Adapter:
    """One registered adapter."""
    name: str
    path: str
    format: str                       # "peft" | "gguf"
    rank: int
    alpha: float
    targets: tuple[str, ...]
    nbytes: int                       # engine memory while resident
    tenants: frozenset[str] | None = None   # who may use it; None: every tenant
    uid: int = 0                      # unique per registration; seeds prefix-cache hashes
    resident: bool = True
    users: set[str] = field(default_factory=set)   # ids of the live requests using it
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    loads: int = 1                    # times made resident (1 + reloads after eviction)

    def may_use(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants


@dataclass
class AdapterInfo:
    """An adapter as callers outside the kernel see it."""
    name: str
    path: str
    format: str
    rank: int
    alpha: float
    targets: list[str]
    bytes: int
    resident: bool
    active_requests: int
    tenants: list[str] | None
    loaded_at: float
    loads: int

    @classmethod
    def of(cls, a: Adapter) -> AdapterInfo:
        return cls(a.name, a.path, a.format, a.rank, a.alpha, list(a.targets), a.nbytes, a.resident, len(a.users),
                   sorted(a.tenants) if a.tenants is not None else None, a.loaded_at, a.loads)


class AdapterTable:
    """The registered adapters and the memory their resident weights hold. Written under
    the engine lock; `make_room` only decides, the engine drops the weights it names."""

    def __init__(self, memory_budget: int, max_resident: int) -> None:
        self.memory_budget = memory_budget
        self.max_resident = max_resident
        self._rows: dict[str, Adapter] = {}
        self._uids = itertools.count(1)
        self.evictions = 0

    # -- reading ---------------------------------------------------------------------------
    def get(self, name: str) -> Adapter:
        row = self._rows.get(name)
        if row is None:
            raise NoSuchAdapter(name, list(self._rows))
        return row

    def find(self, name: str) -> Adapter | None:
        return self._rows.get(name)

    def list(self) -> list[AdapterInfo]:
        return [AdapterInfo.of(a) for a in sorted(self._rows.values(), key=lambda a: a.name)]

    @property
    def used_bytes(self) -> int:
        return sum(a.nbytes for a in self._rows.values() if a.resident)

    @property
    def num_resident(self) -> int:
        return sum(1 for a in self._rows.values() if a.resident)

    def check(self, name: str, tenant: str) -> Adapter:
        """The adapter, if it exists and the tenant may use it."""
        row = self.get(name)
        if not row.may_use(tenant):
            raise AdapterNotAllowed(name, tenant)
        return row

    # -- memory ----------------------------------------------------------------------------
    def make_room(self, nbytes: int, keep: str | None = None) -> list[str]:
        """Names of the idle resident adapters to evict, least recently used first, so that
        one more adapter of `nbytes` fits the budget and the count; marks them evicted.
        Raises (evicting nothing) when the adapters in use leave no room."""
        if nbytes > self.memory_budget:
            raise InvalidRequestError(f"adapter: needs {nbytes} bytes, more than all of adapter_memory "
                                      f"({self.memory_budget} bytes)")
        resident = [a for a in self._rows.values() if a.resident and a.name != keep]
        used, count = sum(a.nbytes for a in resident), len(resident)
        victims: list[Adapter] = []
        for a in sorted((a for a in resident if not a.users), key=lambda a: a.last_used):
            if used + nbytes <= self.memory_budget and count < self.max_resident:
                break
            victims.append(a)
            used, count = used - a.nbytes, count - 1
        if used + nbytes > self.memory_budget or count >= self.max_resident:
            raise AdapterMemoryFull(
                f"adapter: no room for {nbytes} more bytes: {count} adapters in use hold {used} of "
                f"{self.memory_budget} bytes (max_loaded_adapters={self.max_resident}); retry when requests end")
        for a in victims:
            a.resident = False
            self.evictions += 1
        return [a.name for a in victims]

    def register(self, row: Adapter) -> list[str]:
        """Add a new, resident adapter; returns the names evicted to make room."""
        check_name(row.name)
        if row.name in self._rows:
            raise InvalidRequestError(f"adapter: {row.name!r} is already loaded; unload it first")
        evicted = self.make_room(row.nbytes)
        row.uid = next(self._uids)
        row.resident = True
        self._rows[row.name] = row
        return evicted

    def reside(self, name: str, nbytes: int) -> list[str]:
        """Mark an evicted adapter resident again (its weights were read back); returns the
        names evicted to make room for it."""
        row = self.get(name)
        evicted = self.make_room(nbytes, keep=name)
        row.nbytes, row.resident = nbytes, True
        row.loads += 1
        return evicted

    def remove(self, name: str) -> Adapter:
        row = self.get(name)
        if row.users:
            raise AdapterBusy(f"adapter: {name!r} is in use by {len(row.users)} live request(s); "
                              f"unload it when they end")
        del self._rows[name]
        return row

    # -- users -----------------------------------------------------------------------------
    def acquire(self, name: str, tenant: str, request_id: str) -> Adapter:
        """Count a request as a user of a resident adapter its tenant may use."""
        row = self.check(name, tenant)
        if not row.resident:
            raise AdapterMemoryFull(f"adapter: {name!r} is not resident; load it back first")
        row.users.add(request_id)
        row.last_used = time.monotonic()
        return row

    def release(self, name: str, request_id: str) -> None:
        row = self._rows.get(name)
        if row is not None and request_id in row.users:
            row.users.discard(request_id)
            row.last_used = time.monotonic()
