"""The caller's grip on one request: wait for it, stream it, or steer it."""

from __future__ import annotations

from llmos.engine.engine_loop import EngineLoop
from llmos.kernel.request import Sequence
from llmos.outputs import OutputStream, RequestMetrics, RequestOutput, StreamDelta


class RequestHandle(OutputStream):
    """Thread-safe: the engine thread pushes deltas in, any thread reads them out. Steering
    calls take effect at the next step boundary."""

    def __init__(self, loop: EngineLoop) -> None:
        super().__init__()
        self._loop = loop
        self._seq: Sequence | None = None

    # the Listener interface, called by the engine loop
    def attach(self, seq: Sequence) -> None:
        self._seq = seq

    def push(self, delta: StreamDelta) -> None:
        self._deltas.put(delta)

    def finish(self, output: RequestOutput | None, error: Exception | None = None) -> None:
        self._output, self._error = output, error
        self._done.set()
        if error is not None:
            self._deltas.put(StreamDelta(self.request_id, "", [], True, "error"))

    # for the caller
    @property
    def request_id(self) -> str:
        return self._seq.request_id

    @property
    def tenant(self) -> str:
        return self._seq.tenant

    @property
    def owner_pid(self) -> int | None:
        return self._seq.owner_pid

    def cancel(self) -> bool:
        return self._loop.call(lambda e: e.abort_request(self.request_id))

    def suspend(self) -> bool:
        return self._loop.call(lambda e: e.kernel.suspend(self.request_id))

    def resume(self) -> bool:
        return self._loop.call(lambda e: e.kernel.resume(self.request_id))

    def set_priority(self, priority: int, weight: float | None = None) -> bool:
        return self._loop.call(lambda e: e.kernel.set_priority(self.request_id, priority, weight))

    @property
    def status(self) -> str:
        return self._seq.status.value

    @property
    def metrics(self) -> RequestMetrics:
        return self._seq.metrics
