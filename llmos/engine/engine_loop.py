"""The engine loop on its own thread.

One thread owns the engine and steps it while there is work. Callers on any thread submit
and control requests through `EngineLoop`; each call takes the engine lock, which the loop
holds only for the length of one step, so a cancel or a new request takes effect at the
next step boundary at the latest. Output reaches callers through each request's listener.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from llmos.engine.llm_engine import LLMEngine
from llmos.errors import LLMOSError
from llmos.kernel.request import Listener, Sequence
from llmos.sampling_params import SamplingParams

log = logging.getLogger("llmos.engine")


class EngineLoop:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.lock = threading.RLock()
        self._wake = threading.Condition(self.lock)
        self._stopping = False
        self._callers = 0   # threads waiting for the lock; the loop steps aside for them
        self._callers_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="llmos-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt, params: SamplingParams | None, listener: Listener, **kw) -> Sequence:
        """Queue a request whose output goes to `listener`; kw as LLMEngine.add_request."""
        prepared = self.engine.prepare_request(prompt, params, adapter=kw.get("adapter"),   # tokenize outside the lock
                                               tenant=kw.get("tenant", "default"))
        with self._locked():
            if self._stopping:
                raise LLMOSError("the engine is shutting down")
            seq = self.engine.add_request(prepared=prepared, **kw)
            seq.listener = listener
            listener.attach(seq)
            self._wake.notify()
        return seq

    def call(self, fn):
        """Run fn(engine) between steps; the lock makes it atomic with respect to the loop."""
        with self._locked():
            result = fn(self.engine)
            self.engine.collect_deltas()
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
                    self.engine.step()
                except Exception as e:   # a bug must not strand every caller: fail what was in flight
                    log.exception("engine step failed; failing in-flight requests")
                    self._fail_all(e)

    def _fail_all(self, error: Exception) -> None:
        for seq in self.engine.requests.all():
            self.engine.abort_request(seq.request_id)
            seq.io.deltas.clear()
            self.engine.kernel.release(seq)
            if seq.listener is not None:
                seq.listener.finish(None, error)

    def shutdown(self) -> None:
        with self.lock:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout=10)
