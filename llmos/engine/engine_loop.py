"""The engine loop on its own thread, and the handles callers hold on their requests.

One thread owns the engine and steps it while there is work. Callers on any thread submit
and control requests through `EngineLoop`; each call takes the engine lock, which the loop
holds only for the length of one step, so a cancel or a new request takes effect at the
next step boundary at the latest.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
import threading
from collections.abc import Iterator

from llmos.engine.llm_engine import LLMEngine
from llmos.engine.sequence import Sequence
from llmos.errors import LLMOSError
from llmos.outputs import RequestOutput, StreamDelta
from llmos.sampling_params import SamplingParams

log = logging.getLogger("llmos.engine")


class RequestHandle:
    """A caller's grip on one request: wait for it, stream it, or steer it."""

    def __init__(self, loop: EngineLoop, seq: Sequence) -> None:
        self._loop = loop
        self._seq = seq
        self.request_id = seq.request_id
        self.tenant = seq.tenant
        self._deltas: queue.SimpleQueue[StreamDelta] = queue.SimpleQueue()
        self._done = threading.Event()
        self._output: RequestOutput | None = None
        self._error: Exception | None = None

    # called by the loop
    def _push(self, delta: StreamDelta) -> None:
        self._deltas.put(delta)

    def _finish(self, output: RequestOutput | None, error: Exception | None = None) -> None:
        self._output, self._error = output, error
        self._done.set()
        if error is not None:
            self._deltas.put(StreamDelta(self.request_id, "", [], True, "error"))

    # for the caller
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        if self._error is not None:
            raise LLMOSError(f"request {self.request_id} failed: {self._error}") from self._error
        return self._output

    def __iter__(self) -> Iterator[StreamDelta]:
        while True:
            delta = self._deltas.get()
            yield delta
            if delta.finished:
                return

    def cancel(self) -> bool:
        return self._loop.call(lambda e: e.abort_request(self.request_id))

    def suspend(self) -> bool:
        return self._loop.call(lambda e: e.suspend_request(self.request_id))

    def resume(self) -> bool:
        return self._loop.call(lambda e: e.resume_request(self.request_id))

    def set_priority(self, priority: int) -> bool:
        return self._loop.call(lambda e: e.set_priority(self.request_id, priority))

    @property
    def status(self) -> str:
        return self._seq.status.value

    @property
    def metrics(self):
        return self._seq.metrics


class EngineLoop:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.lock = threading.RLock()
        self._wake = threading.Condition(self.lock)
        self._handles: dict[str, RequestHandle] = {}
        self._stopping = False
        self._callers = 0   # threads waiting for the lock; the loop steps aside for them
        self._callers_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="llmos-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt, params: SamplingParams | None = None, *, tenant: str = "default", priority: int = 0,
               request_id: str | None = None) -> RequestHandle:
        prepared = self.engine.prepare_request(prompt, params)   # tokenize outside the lock
        with self._locked():
            if self._stopping:
                raise LLMOSError("the engine is shutting down")
            seq = self.engine.add_request(None, prepared=prepared, tenant=tenant, priority=priority,
                                          request_id=request_id)
            handle = self._handles[seq.request_id] = RequestHandle(self, seq)
            self._wake.notify()
        return handle

    def call(self, fn):
        """Run fn(engine) between steps; the lock makes it atomic with respect to the loop."""
        with self._locked():
            result = fn(self.engine)
            self._dispatch(self.engine.collect_deltas())
            self._wake.notify()
            return result

    @contextlib.contextmanager
    def _locked(self):
        with self._callers_lock:
            self._callers += 1
        self.lock.acquire()
        with self._callers_lock:
            self._callers -= 1
        try:
            yield
        finally:
            self.lock.release()

    def _dispatch(self, deltas: list[StreamDelta]) -> None:
        for d in deltas:
            h = self._handles.get(d.request_id)
            if h is None:
                continue
            h._push(d)
            if d.finished:
                del self._handles[d.request_id]
                h._finish(self.engine.output(h._seq))

    def _run(self) -> None:
        while True:
            while self._callers > 0 and not self._stopping:
                time.sleep(0.0005)
            with self.lock:
                while not self._stopping and not self.engine.has_unfinished():
                    self._wake.wait()
                if self._stopping:
                    return
                try:
                    self._dispatch(self.engine.step())
                except Exception as e:   # a bug must not strand every caller: fail what was in flight
                    log.exception("engine step failed; failing in-flight requests")
                    for rid, h in list(self._handles.items()):
                        self.engine.abort_request(rid)
                        h._finish(None, e)
                    self._handles.clear()
                    self.engine.collect_deltas()

    def shutdown(self) -> None:
        with self.lock:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout=10)
