"""What every request handler shares: the engine, the key store, the limits, the server's
table of the engine requests it submitted, and the drain state."""

from __future__ import annotations

import threading
import time

import anyio
from dataclasses import dataclass, field

from llmos.api.llm import LLM
from llmos.engine.engine_loop import RequestHandle
from llmos.server.drain import Drain
from llmos.server.embeddings import Embedder
from llmos.server.keys import KeyStore
from llmos.server.limits import RateLimiter
from llmos.server.settings import Settings


@dataclass
class Submitted:
    """The server's record of one engine request: its handle and who owns it."""
    handle: RequestHandle
    tenant: str
    key_id: str | None
    user: str | None
    created: int


class RequestTable:
    """Engine requests submitted over HTTP, by request id. The kernel API steers requests
    through their handles here, and only the owning tenant (or an admin) finds them."""

    def __init__(self) -> None:
        self._entries: dict[str, Submitted] = {}
        self._lock = threading.Lock()

    def add(self, entry: Submitted) -> None:
        with self._lock:
            self._entries[entry.handle.request_id] = entry

    def remove(self, request_id: str) -> None:
        with self._lock:
            self._entries.pop(request_id, None)

    def get(self, request_id: str) -> Submitted | None:
        with self._lock:
            return self._entries.get(request_id)

    def all(self) -> list[Submitted]:
        with self._lock:
            return list(self._entries.values())


@dataclass
class ServerState:
    settings: Settings
    llm: LLM
    keys: KeyStore
    embedder: Embedder
    limiter: RateLimiter = field(default_factory=RateLimiter)
    table: RequestTable = field(default_factory=RequestTable)
    drain: Drain = field(default_factory=Drain)
    started: int = field(default_factory=lambda: int(time.time()))
    # Threads that may wait on the engine lock to submit at once. Many: a submit waits out the
    # engine step in progress, and every caller waiting then joins the next step together.
    submit_limiter: anyio.CapacityLimiter | None = None
    _weights: dict[str, float] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.llm.engine.model_name

    def set_weight(self, tenant: str, weight: float) -> None:
        """Give the tenant the weight its key carries (blocking: takes the engine lock)."""
        if self._weights.get(tenant) != weight:
            self.llm.set_tenant(tenant, weight=weight)
            self._weights[tenant] = weight
