"""What every request handler shares: the engine (through the `LLM` facade), the key store,
the limits and the drain state. Live requests are found in the kernel's one table."""

from __future__ import annotations

import time

import anyio
from dataclasses import dataclass, field

from llmos.api.llm import LLM
from llmos.kernel.agents import AgentKernel
from llmos.kernel.intrusion import IntrusionDetector
from llmos.server.drain import Drain
from llmos.server.embeddings import Embedder
from llmos.server.keys import KeyStore
from llmos.server.limits import RateLimiter
from llmos.server.monitor import Monitor
from llmos.server.settings import Settings


@dataclass
class ServerState:
    settings: Settings
    llm: LLM
    keys: KeyStore
    embedder: Embedder
    limiter: RateLimiter = field(default_factory=RateLimiter)
    drain: Drain = field(default_factory=Drain)
    agents: AgentKernel | None = None          # started with the server (lifespan)
    monitor: Monitor | None = None             # samples the kernel for the dashboard and `llmos top`
    # Bad API keys per client address; past the threshold the address is refused for a while.
    guard: IntrusionDetector = field(default_factory=IntrusionDetector)
    started: int = field(default_factory=lambda: int(time.time()))
    # Threads that may wait on the engine lock to submit at once. Many: a submit waits out the
    # engine step in progress, and every caller waiting then joins the next step together.
    submit_limiter: anyio.CapacityLimiter | None = None
    _weights: dict[str, float] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.llm.model_name

    def served_models(self) -> list[str]:
        """The generation models a request may name."""
        return [self.model_name]

    def set_weight(self, tenant: str, weight: float) -> None:
        """Give the tenant the weight its key carries (blocking: takes the engine lock)."""
        if self._weights.get(tenant) != weight:
            self.llm.set_tenant(tenant, weight=weight)
            self._weights[tenant] = weight
