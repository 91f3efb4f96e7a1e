"""A request's handle in the cluster: what the caller holds (the interface of
`RequestHandle`), and the thread that streams the request from its replica and, when the
replica dies, moves it to another from exactly where the client's stream stands."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING

from llmos.errors import LLMOSError
from llmos.kernel.request import RequestInfo
from llmos.outputs import OutputStream, RequestMetrics, RequestOutput, StreamDelta
from llmos.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llmos.cluster.cluster import ClusterLLM

log = logging.getLogger("llmos.cluster")


class ClusterHandle(OutputStream):
    """A request's handle in the cluster: the same interface as `RequestHandle`."""

    def __init__(self, cluster: ClusterLLM, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 labels: dict, session: str | None) -> None:
        super().__init__()
        self.cluster = cluster
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.labels = labels
        self.tenant = labels["tenant"]
        self.priority = labels["priority"]
        self.owner_pid = labels.get("owner_pid")
        self.session = session
        self.hashes = cluster.router.prefix_hashes(prompt_ids, labels.get("adapter"))
        self.metrics = RequestMetrics(arrival_time=time.time())
        self.created = int(self.metrics.arrival_time)
        self.replica: int | None = None
        self.failovers = 0
        self.token_ids: list[int] = []
        self.logprobs: list | None = [] if params.logprobs is not None else None
        self._text: list[str] = []
        self._status = "waiting"
        self._suspended = False
        self._cancelled = False
        self._granted = threading.Event()
        self._queued_at = time.monotonic()
        self._pending_finish: StreamDelta | None = None
        self._charged = False     # its full cost (prompt + max_tokens) is on its tenant's clock

    # -- the caller's side (as RequestHandle) ------------------------------------------------
    @property
    def status(self) -> str:
        return self._status

    def cancel(self) -> bool:
        return self.cluster._act(self, "cancel")

    def suspend(self) -> bool:
        return self.cluster._act(self, "suspend")

    def resume(self) -> bool:
        return self.cluster._act(self, "resume")

    def set_priority(self, priority: int, weight: float | None = None) -> bool:
        return self.cluster._act(self, "set_priority", priority, weight)

    def info(self) -> RequestInfo:
        return RequestInfo(self.request_id, self.tenant, self.priority, self._status, len(self.prompt_ids),
                           len(self.token_ids), 0, self.owner_pid, self.labels.get("user"), self.created,
                           round(time.monotonic() - self._queued_at, 3), replica=None)

    # -- the stream, on its own thread -------------------------------------------------------
    def run(self) -> None:
        try:
            while True:
                self._granted.wait()
                self._granted.clear()
                if self._cancelled or self.replica is None:
                    self._finish("abort", None)
                    return
                if self._stream(self.replica):
                    return
                self.failovers += 1
                self.cluster._requeue(self)
        except Exception as e:                       # never strand the caller
            log.exception("request %s failed in the cluster", self.request_id)
            self._fail(e)
        finally:
            self.cluster._forget(self)

    def _stream(self, index: int) -> bool:
        """Run (or continue) the request on replica `index`; False if the replica died."""
        import ray
        left = self.params.max_tokens - len(self.token_ids)
        if left <= 0:
            self._finish("length", None)
            return True
        params = dataclasses.replace(self.params, max_tokens=left)
        slot = self.cluster.slots[index]
        stream = slot.actor.generate.options(num_returns="streaming").remote(
            self.request_id, self.prompt_ids + self.token_ids, params, self.labels)
        try:
            for ref in stream:
                kind, item = ray.get(ref)
                if kind == "accepted":
                    self._status = "running"
                    if self._suspended:               # suspended while it was being placed
                        self.cluster._forward(self, "suspend")
                elif kind == "delta":
                    self._on_delta(item)
                elif kind == "output":
                    self._finish(item.finish_reason, item.stop_reason)
                    return True
                else:
                    self._fail(LLMOSError(item))
                    return True
            return True
        except ray.exceptions.RayTaskError as e:     # the replica refused the request itself
            self._fail(e.as_instanceof_cause())
            return True
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
            log.warning("replica %d lost during %s after %d tokens (%s); moving it", index, self.request_id,
                        len(self.token_ids), type(e).__name__)
            self.cluster._replica_down(index)
            if self._pending_finish is not None:      # it had finished; only the summary was lost
                self._finish(self._pending_finish.finish_reason, None)
            return self._done.is_set()
        finally:
            self.cluster.router.done(index)

    def _on_delta(self, delta: StreamDelta) -> None:
        now = time.time()
        if delta.token_ids:
            if self.metrics.first_token_time is None:
                self.metrics.first_token_time = now
            self.metrics.last_token_time = now
            self.metrics.num_output_tokens += len(delta.token_ids)
            self.token_ids.extend(delta.token_ids)
        self._text.append(delta.text)
        if self.logprobs is not None and delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finished:
            self._pending_finish = delta
            return
        self._deltas.put(StreamDelta(self.request_id, delta.text, list(delta.token_ids), False, None, delta.logprobs))

    def _settle(self) -> None:
        """Give back the part of the charge made at dispatch that was not generated."""
        if self._charged:
            self.cluster._charge(self.tenant, -(self.params.max_tokens - len(self.token_ids)))
            self._charged = False

    def _finish(self, reason: str | None, stop_reason) -> None:
        self._settle()
        last = self._pending_finish
        self.metrics.finished_time = time.time()
        self._status = "finished"
        self._output = RequestOutput(self.request_id, None, self.prompt_ids, "".join(self._text), self.token_ids,
                                     True, reason, self.metrics, self.logprobs, stop_reason)
        self._done.set()
        self._deltas.put(StreamDelta(self.request_id, last.text if last else "", list(last.token_ids) if last else [],
                                     True, reason, last.logprobs if last else None))

    def _fail(self, error: Exception) -> None:
        self._settle()
        self._status = "finished"
        self._error = error
        self._done.set()
        self._deltas.put(StreamDelta(self.request_id, "", [], True, "error"))
