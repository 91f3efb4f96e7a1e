"""Intrusion detection on the audit stream: a process that keeps trying what it may not do,
and an address that keeps guessing API keys.

One denied syscall is a bug; many within a minute are a probe, or an agent the model has
talked into trying its way out. The detector counts denials per process in a sliding
window and says once, when the count reaches the threshold, that the process should be
suspended and flagged for a human. Failed API keys are counted per client address the same
way, and an address that reaches the threshold is refused for `block_seconds`.

Only the newest `threshold` event times are kept per process or address, so memory per key
is bounded, and keys quiet for a whole window are forgotten.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from llmos.errors import InvalidRequestError


class IntrusionDetector:
    def __init__(self, *, denial_threshold: int = 20, denial_window: float = 60.0, auth_threshold: int = 10,
                 auth_window: float = 60.0, block_seconds: float = 300.0, clock=time.monotonic) -> None:
        if denial_threshold < 1 or auth_threshold < 1:
            raise InvalidRequestError(f"denial_threshold, auth_threshold: must be at least 1, got "
                                      f"{denial_threshold}, {auth_threshold}")
        self.denial_threshold, self.denial_window = denial_threshold, denial_window
        self.auth_threshold, self.auth_window = auth_threshold, auth_window
        self.block_seconds = block_seconds
        self.clock = clock
        self.flagged: set[int] = set()
        self.denials = 0                  # denied syscalls seen, all processes
        self.processes_flagged = 0
        self.addresses_blocked = 0
        self._lock = threading.Lock()
        self._denied_at: dict[int, deque[float]] = {}
        self._failed_at: dict[str, deque[float]] = {}
        self._blocked_until: dict[str, float] = {}
        self._pruned_at = clock()

    @staticmethod
    def _burst(events: dict, key, now: float, threshold: int, window: float) -> bool:
        """Note one event; True when `threshold` of them fell within `window` seconds."""
        times = events.get(key)
        if times is None:
            times = events[key] = deque(maxlen=threshold)
        times.append(now)
        return len(times) == threshold and now - times[0] <= window

    def _prune(self, now: float) -> None:
        if now - self._pruned_at < min(self.denial_window, self.auth_window):
            return
        self._pruned_at = now
        for events, window in ((self._denied_at, self.denial_window), (self._failed_at, self.auth_window)):
            for key in [k for k, times in events.items() if now - times[-1] > window]:
                del events[key]
        for address in [a for a, until in self._blocked_until.items() if until <= now]:
            del self._blocked_until[address]

    def denied(self, pid: int) -> bool:
        """Record a denied syscall of `pid`; True exactly once, when its denials within the
        window reach the threshold: the caller then suspends the process."""
        with self._lock:
            now = self.clock()
            self._prune(now)
            self.denials += 1
            if pid in self.flagged or not self._burst(self._denied_at, pid, now, self.denial_threshold,
                                                      self.denial_window):
                return False
            self.flagged.add(pid)
            self.processes_flagged += 1
            del self._denied_at[pid]
            return True

    def auth_failed(self, address: str) -> None:
        """Record a request from `address` that presented a wrong API key."""
        with self._lock:
            now = self.clock()
            self._prune(now)
            if self._blocked_until.get(address, now) > now:
                return                      # already refused; the block is not extended
            if self._burst(self._failed_at, address, now, self.auth_threshold, self.auth_window):
                self._blocked_until[address] = now + self.block_seconds
                self.addresses_blocked += 1
                del self._failed_at[address]

    def blocked(self, address: str) -> float | None:
        """Seconds left of `address`'s block, or None when it may try keys."""
        with self._lock:
            left = self._blocked_until.get(address, 0.0) - self.clock()
            return left if left > 0 else None
