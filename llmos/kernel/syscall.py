"""System calls: the only way an agent process touches the system.

Every call goes through `SyscallTable.call`, which, like xv6's syscall(), looks the call
up in one table from name to handler, and around the handler does what makes llmos an OS
rather than a library: checks the caller's capabilities, writes the call to the audit log
before it runs and its outcome after, counts it, feeds denials to intrusion detection,
and for a durable process journals the outcome, so that when the process is restarted
and makes the same call again (same sequence number) it gets the recorded outcome
instead of running the side effect twice.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from llmos.errors import InvalidRequestError, LLMOSError
from llmos.kernel.audit import AuditLog
from llmos.kernel.capabilities import Capabilities, PermissionDenied, required_for
from llmos.kernel.intrusion import IntrusionDetector
from llmos.kernel.journal import Journal, digest
from llmos.kernel.process import Process

Handler = Callable[[Process, dict], Any]
_CHECKED_ARGS = ("to", "topic", "path", "name", "key", "prefix", "shared")   # what capabilities look at


@functools.lru_cache(maxsize=1024)
def _capabilities(caps: tuple[str, ...]) -> Capabilities:
    return Capabilities(caps)


class ReplayedError(LLMOSError):
    """An error a durable process's call failed with before its restart, handed back again
    from the journal. `kind` is the original error's class name."""

    def __init__(self, kind: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.param = kind, param


def error_record(e: Exception) -> dict:
    kind = e.kind if isinstance(e, ReplayedError) else type(e).__name__
    param = getattr(e, "capability", None) or getattr(e, "param", None)
    return {"kind": kind, "message": str(e), "param": param}


class SyscallTable:
    def __init__(self, handlers: dict[str, Handler], audit: AuditLog, journal: Journal,
                 intrusion: IntrusionDetector, *, on_intrusion: Callable[[Process], None],
                 on_call: Callable[[Process], None],
                 checked_args: Callable[[Process, str, dict], dict] = lambda proc, call, args: args) -> None:
        self.handlers = handlers
        self.audit = audit
        self.journal = journal
        self.intrusion = intrusion
        self.on_intrusion = on_intrusion
        self.on_call = on_call
        self.checked_args = checked_args     # the arguments as the capability check sees them
        self.counts: Counter[tuple[str, str]] = Counter()    # (family, outcome) -> calls
        self._lock = threading.Lock()

    def call(self, proc: Process, call: str, args: dict, seq: int | None = None) -> Any:
        if not isinstance(call, str) or call not in self.handlers:
            raise InvalidRequestError(f"call: unknown system call {call!r}; known: {', '.join(sorted(self.handlers))}")
        if not isinstance(args, dict):
            raise InvalidRequestError(f"args: must be an object, got {type(args).__name__}")
        self.on_call(proc)
        try:
            checked = self.checked_args(proc, call, args)
            required = required_for(call, **{k: checked[k] for k in _CHECKED_ARGS if k in checked})
            if required is not None and not _capabilities(tuple(proc.caps)).allows(required):
                raise PermissionDenied(call, proc.pid, required)
        except PermissionDenied as e:
            rid = self.audit.begin(proc.pid, proc.tenant, call, args, False, e.capability)
            self.audit.finish(rid, "PermissionDenied", 0.0)
            self._count(call, "denied")
            if self.intrusion.denied(proc.pid):
                self.on_intrusion(proc)
            raise
        rid = self.audit.begin(proc.pid, proc.tenant, call, args, True)
        t0 = time.perf_counter()
        try:
            result = self._run(proc, call, args, seq)
        except Exception as e:
            self.audit.finish(rid, error_record(e)["kind"], time.perf_counter() - t0)
            self._count(call, "error")
            raise
        self.audit.finish(rid, "ok", time.perf_counter() - t0)
        self._count(call, "ok")
        return result

    def _run(self, proc: Process, call: str, args: dict, seq: int | None) -> Any:
        if not proc.durable or seq is None:
            return self.handlers[call](proc, args)
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise InvalidRequestError(f"seq: must be a non-negative integer, got {seq!r}")
        d = digest(args)
        with self.journal.claim(proc.pid, seq):
            entry = self.journal.lookup(proc.pid, seq, call, d)
            if entry is not None:
                with self._lock:
                    self.counts[(call.split(".")[0], "replayed")] += 1
                if entry.error is not None:
                    raise ReplayedError(entry.error["kind"], entry.error["message"], entry.error.get("param"))
                return entry.result
            try:
                result = self.handlers[call](proc, args)
            except Exception as e:
                self.journal.record(proc.pid, seq, call, d, error=error_record(e))
                raise
            self.journal.record(proc.pid, seq, call, d, result=result)
            return result

    def _count(self, call: str, outcome: str) -> None:
        with self._lock:
            self.counts[(call.split(".")[0], outcome)] += 1
