"""The worker pool tool calls run in: the "thread pool" of the design, with a deadline on
every call and limits on how many run at once.

A Python thread cannot be killed, so a tool that hangs keeps its thread. What the pool
promises is that it costs only its caller: the caller gets `ToolTimeout` at the deadline,
the stuck worker is written off, and a fresh worker takes its place, so the pool's
capacity is the same after a hang as before. (Tools that must really be stopped, like the
python tool, run in a child process that the tool itself kills at its deadline.) Written-off
workers are bounded too: past `max_lost` of them still stuck, new calls are refused rather
than letting hung tools eat threads without end.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from llmos.errors import LLMOSError, QueueFullError
from llmos.tools.registry import Tool, ToolContext, ToolError


class ToolTimeout(ToolError):
    """The call did not finish by its deadline; its caller stops waiting for it."""


class ToolBusy(QueueFullError):
    """Too many calls are waiting, or too many of this tool are running; retry later."""


@dataclass
class _Job:
    tool: Tool
    args: dict
    ctx: ToolContext
    future: Future
    worker: int | None = None          # the worker running it, once one has taken it


class ToolPool:
    def __init__(self, workers: int = 8, *, default_timeout: float = 30.0, max_waiting: int = 256,
                 max_lost: int = 64) -> None:
        self.workers = workers
        self.default_timeout = default_timeout
        self.max_waiting = max_waiting
        self.max_lost = max_lost
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._running: Counter[str] = Counter()      # tool name -> calls in flight
        self._lost: set[int] = set()                 # ids of written-off workers still stuck
        self._next_id = 0
        self.counts: Counter[str] = Counter()         # ok | error | timeout | refused
        self.seconds = 0.0
        self._closed = False
        for _ in range(workers):
            self._start_worker()

    def _start_worker(self) -> None:
        with self._lock:
            wid = self._next_id
            self._next_id += 1
        threading.Thread(target=self._work, args=(wid,), name=f"llmos-tool-{wid}", daemon=True).start()

    def _work(self, wid: int) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            job.worker = wid
            try:
                args = (job.ctx,) if job.tool.takes_ctx else ()
                job.future.set_result(job.tool.func(*args, **job.args))
            except BaseException as e:           # a crashing tool is its caller's error
                job.future.set_exception(e)
            with self._lock:
                if wid in self._lost:            # replaced while stuck: leave the pool
                    self._lost.discard(wid)
                    return

    def submit(self, tool: Tool, args: dict, ctx: ToolContext) -> _Job:
        with self._lock:
            if self._closed:
                raise ToolError("the tool pool is shut down")
            if self._queue.qsize() >= self.max_waiting or len(self._lost) >= self.max_lost:
                self.counts["refused"] += 1
                raise ToolBusy(f"{tool.name}: {self._queue.qsize()} tool calls are waiting "
                               f"and {len(self._lost)} are stuck; retry later")
            if tool.max_concurrency is not None and self._running[tool.name] >= tool.max_concurrency:
                self.counts["refused"] += 1
                raise ToolBusy(f"{tool.name}: already running {tool.max_concurrency} calls, its limit")
            self._running[tool.name] += 1
        job = _Job(tool, args, ctx, Future())
        self._queue.put(job)
        return job

    def run(self, tool: Tool, args: dict, ctx: ToolContext, timeout: float | None = None) -> Any:
        """Run one call to completion or its deadline. `args` must already be validated."""
        timeout = timeout or tool.timeout or self.default_timeout
        start = time.monotonic()
        job = self.submit(tool, args, ctx)
        outcome = "ok"
        try:
            return job.future.result(timeout=timeout)
        except FutureTimeout:
            outcome = "timeout"
            if not job.future.cancel():           # it started: its worker is stuck in it
                self._write_off(job)
            raise ToolTimeout(f"{tool.name}: no result within {timeout:g} s") from None
        except LLMOSError:                        # a tool's own clear error (ToolError, PathEscape, ...)
            outcome = "error"
            raise
        except Exception as e:
            outcome = "error"
            raise ToolError(f"{tool.name}: {type(e).__name__}: {e}") from None
        finally:
            with self._lock:
                self._running[tool.name] -= 1
                self.counts[outcome] += 1
                self.seconds += time.monotonic() - start

    def _write_off(self, job: _Job) -> None:
        """The worker stuck in `job` leaves the pool when (if ever) the call returns; a new
        worker takes its place now."""
        with self._lock:
            if job.worker is not None and not job.future.done():
                self._lost.add(job.worker)
            else:
                return                            # finished just now: its worker is free again
        self._start_worker()

    def stats(self) -> dict:
        with self._lock:
            return {"workers": self.workers, "waiting": self._queue.qsize(), "stuck": len(self._lost),
                    "running": sum(self._running.values()), "calls": dict(self.counts),
                    "seconds": round(self.seconds, 3)}

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
        for _ in range(self._next_id):
            self._queue.put(None)
