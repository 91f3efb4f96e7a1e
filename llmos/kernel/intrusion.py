"""Intrusion detection on the audit stream: a process that keeps trying what it may not do,
and an address that keeps guessing API keys.

One denied syscall is a bug; many within a minute are a probe, or an agent the model has
talked into trying its way out. The detector counts denials per process in a sliding
window and says once, when the count reaches the threshold, that the process should be
suspended and flagged for a human. Failed API keys are counted per client address the same
way, and an address that reaches the threshold is blocked for `block_seconds`: its further
bad keys are refused. A valid key is never refused for what its address did, since behind a
proxy or a NAT one address is many users, and anyone could lock them all out.

Only the newest `threshold` event times are kept per process or address, keys quiet for a
whole window are forgotten, and at most `max_addresses` addresses are tracked (the least
recently seen go first), so memory is bounded however many addresses a flood comes from.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from llmos.errors import InvalidRequestError


@dataclass
class _Block:
    until: float
    unreported: int = 0               # refusals since the last one `refused` reported
    reported_at: float = float("-inf")


class IntrusionDetector:
    def __init__(self, *, denial_threshold: int = 20, denial_window: float = 60.0, auth_threshold: int = 10,
                 auth_window: float = 60.0, block_seconds: float = 300.0, max_addresses: int = 16384,
                 report_interval: float = 1.0, clock=time.monotonic) -> None:
        if denial_threshold < 1 or auth_threshold < 1 or max_addresses < 1:
            raise InvalidRequestError(f"denial_threshold, auth_threshold, max_addresses: must be at least 1, got "
                                      f"{denial_threshold}, {auth_threshold}, {max_addresses}")
        self.denial_threshold, self.denial_window = denial_threshold, denial_window
        self.auth_threshold, self.auth_window = auth_threshold, auth_window
        self.block_seconds, self.max_addresses, self.report_interval = block_seconds, max_addresses, report_interval
        self.clock = clock
        self.flagged: set[int] = set()
        self.denials = 0                  # denied syscalls seen, all processes
        self.processes_flagged = 0
        self.addresses_blocked = 0
        self._lock = threading.Lock()
        # Oldest activity first, so what a window forgets is always at the front.
        self._denied_at: OrderedDict[int, deque[float]] = OrderedDict()
        self._failed_at: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocks: OrderedDict[str, _Block] = OrderedDict()     # every block lasts as long: by expiry

    @staticmethod
    def _burst(events: OrderedDict, key, now: float, threshold: int, window: float) -> bool:
        """Note one event; True when `threshold` of them fell within `window` seconds."""
        times = events.get(key)
        if times is None:
            times = events[key] = deque(maxlen=threshold)
        events.move_to_end(key)
        times.append(now)
        return len(times) == threshold and now - times[0] <= window

    def _prune(self, now: float) -> None:
        for events, window in ((self._denied_at, self.denial_window), (self._failed_at, self.auth_window)):
            while events and now - next(iter(events.values()))[-1] > window:
                events.popitem(last=False)
        while self._blocks and next(iter(self._blocks.values())).until <= now:
            self._blocks.popitem(last=False)

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

    def auth_failed(self, address: str) -> bool:
        """Record a request from `address` that presented a wrong API key; True when this one
        gets the address blocked."""
        with self._lock:
            now = self.clock()
            self._prune(now)
            if address in self._blocks:
                return False                # already blocked; the block is not extended
            if not self._burst(self._failed_at, address, now, self.auth_threshold, self.auth_window):
                if len(self._failed_at) > self.max_addresses:
                    self._failed_at.popitem(last=False)
                return False
            del self._failed_at[address]
            self._blocks[address] = _Block(now + self.block_seconds)
            if len(self._blocks) > self.max_addresses:
                self._blocks.popitem(last=False)
            self.addresses_blocked += 1
            return True

    def blocked(self, address: str) -> float | None:
        """Seconds left of `address`'s block, or None when its keys are still checked."""
        with self._lock:
            block = self._blocks.get(address)
            left = block.until - self.clock() if block else 0.0
            return left if left > 0 else None

    def refused(self, address: str) -> int:
        """Count a refused key of blocked `address`. Returns how many refusals are due for a
        record (all since the last report), or 0 within `report_interval` of it: a flood of
        refusals is recorded about once a second per address, not once per request."""
        with self._lock:
            now = self.clock()
            block = self._blocks.get(address)
            if block is None:
                return 0
            block.unreported += 1
            if now - block.reported_at < self.report_interval:
                return 0
            n, block.unreported, block.reported_at = block.unreported, 0, now
            return n
