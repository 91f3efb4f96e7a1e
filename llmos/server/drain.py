"""Graceful shutdown: on SIGTERM the server refuses new work with 503, lets the requests in
flight finish (up to a timeout, then cancels them), and exits 0."""

from __future__ import annotations

import threading

from llmos.server.errors import APIError


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._cond = threading.Condition()

    def admit(self) -> None:
        """Count one more request in flight, or refuse it (503) while draining."""
        with self._cond:
            if self.draining:
                raise APIError(503, "the server is shutting down and accepts no new requests; retry on another "
                                    "instance or after restart", "service_unavailable", code="draining",
                               retry_after=5)
            self.in_flight += 1

    def leave(self) -> None:
        with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()

    def begin(self) -> None:
        with self._cond:
            self.draining = True

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is in flight; False if `timeout` seconds pass first."""
        with self._cond:
            return self._cond.wait_for(lambda: self.in_flight == 0, timeout)
