"""Approvals: a person's yes or no between a process and a tool marked `needs_approval`.

The request is a row in SQLite before anyone is asked, so it outlives the kernel: after a
restart the same call from the same process (same pid and syscall sequence number for a
durable process; same tool and arguments otherwise) finds its request again instead of
asking twice. A request moves pending -> approved | denied | expired, and an approved one
-> done once its tool has run, with the outcome stored, so that it runs exactly once: a
repeated call gets the stored outcome. A pending request past its deadline is denied.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from llmos.errors import InvalidRequestError, LLMOSError

STATES = ("pending", "approved", "denied", "expired", "running", "done")


class ApprovalDenied(LLMOSError):
    """The tool call was refused by a person or ran out of time waiting for one."""

    def __init__(self, approval: Approval) -> None:
        why = approval.reason or ("no decision before the deadline" if approval.state == "expired" else "denied")
        super().__init__(f"{approval.tool}: approval {approval.id} {approval.state}: {why}")
        self.approval = approval
        self.param = approval.id


class NoSuchApproval(InvalidRequestError):
    """No approval request with that id (for this tenant)."""


class AlreadyDecided(InvalidRequestError):
    """The request was approved, denied or expired already; a decision is final."""


@dataclass
class Approval:
    id: str
    tenant: str
    pid: int
    tool: str
    args: dict
    state: str
    created_at: float
    deadline: float
    decided_at: float | None = None
    decided_by: str | None = None
    reason: str | None = None
    result: dict | None = None       # {"ok": value} or {"error": {"kind", "message"}} once done

    def to_dict(self) -> dict:
        return asdict(self)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, pid INTEGER NOT NULL, digest TEXT NOT NULL,
    tool TEXT NOT NULL, args TEXT NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL,
    deadline REAL NOT NULL, decided_at REAL, decided_by TEXT, reason TEXT, result TEXT);
CREATE INDEX IF NOT EXISTS approvals_by_call ON approvals (pid, digest);
CREATE INDEX IF NOT EXISTS approvals_pending ON approvals (state, deadline);
"""
_COLS = "id, tenant, pid, tool, args, state, created_at, deadline, decided_at, decided_by, reason, result"


class ApprovalBook:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        with self._lock:
            self._db.execute("UPDATE approvals SET state='done', result=? WHERE state='running'",
                             (json.dumps({"error": {"kind": "ToolError", "message": "the kernel stopped while this "
                                                    "approved call ran; it may or may not have completed, and is "
                                                    "not run again"}}),))

    def request(self, *, tenant: str, pid: int, tool: str, args: dict, digest: str, timeout: float) -> Approval:
        """The approval request for this call: an undecided or approved one already on
        file for the same process, tool and arguments (a repeat after a restart), or a new
        pending one."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLS} FROM approvals WHERE pid=? AND digest=? AND state IN ('pending', 'approved') "
                "ORDER BY created_at DESC LIMIT 1", (pid, digest)).fetchone()
            if row is not None:
                return _approval(row)
            now = time.time()
            a = Approval(uuid.uuid4().hex[:12], tenant, pid, tool, args, "pending", now, now + timeout)
            self._db.execute(f"INSERT INTO approvals ({_COLS}, digest) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                             (a.id, tenant, pid, tool, json.dumps(args), "pending", now, a.deadline,
                              None, None, None, None, digest))
            return a

    def claim(self, id: str) -> bool:
        """Whether this caller may run the approved call: true for exactly one caller."""
        with self._lock:
            return self._db.execute("UPDATE approvals SET state='running' WHERE id=? AND state='approved'",
                                    (id,)).rowcount == 1

    def get(self, id: str, tenant: str | None = None) -> Approval:
        with self._lock:
            a = self._get(id)
        if a is None or (tenant is not None and a.tenant != tenant):
            raise NoSuchApproval(f"id: no approval request {id!r}")
        return a

    def _get(self, id) -> Approval | None:
        if not isinstance(id, str):
            return None
        row = self._db.execute(f"SELECT {_COLS} FROM approvals WHERE id=?", (id,)).fetchone()
        return _approval(row) if row else None

    def list(self, tenant: str | None = None, state: str | None = None) -> list[Approval]:
        if state is not None and state not in STATES:
            raise InvalidRequestError(f"state: must be one of {', '.join(STATES)}, got {state!r}")
        self.expire()
        q, params = f"SELECT {_COLS} FROM approvals WHERE 1=1", []
        if tenant is not None:
            q, params = q + " AND tenant=?", [*params, tenant]
        if state is not None:
            q, params = q + " AND state=?", [*params, state]
        with self._lock:
            return [_approval(r) for r in self._db.execute(q + " ORDER BY created_at", params)]

    def decide(self, id: str, approve: bool, *, by: str, reason: str | None = None,
               tenant: str | None = None) -> Approval:
        if reason is not None and (not isinstance(reason, str) or len(reason) > 1000):
            raise InvalidRequestError("reason: must be a string of at most 1000 characters")
        self.expire()
        with self._changed:
            a = self._get(id)
            if a is None or (tenant is not None and a.tenant != tenant):
                raise NoSuchApproval(f"id: no approval request {id!r}")
            if a.state != "pending":
                raise AlreadyDecided(f"id: approval {id} is already {a.state}")
            state = "approved" if approve else "denied"
            self._db.execute("UPDATE approvals SET state=?, decided_at=?, decided_by=?, reason=? WHERE id=?",
                             (state, time.time(), by, reason, id))
            self._changed.notify_all()
            return self._get(id)

    def finish(self, id: str, result: dict) -> None:
        """Record the outcome of the approved call: from now on it is done."""
        with self._changed:
            self._db.execute("UPDATE approvals SET state='done', result=? WHERE id=? AND state='running'",
                             (json.dumps(result, default=str), id))
            self._changed.notify_all()

    def expire(self) -> int:
        with self._changed:
            n = self._db.execute("UPDATE approvals SET state='expired', decided_at=?, reason=? "
                                 "WHERE state='pending' AND deadline<?",
                                 (time.time(), "no decision before the deadline", time.time())).rowcount
            if n:
                self._changed.notify_all()
            return n

    def wait(self, id: str, timeout: float) -> Approval:
        """Block until the request is decided and not being run (neither pending nor
        running) or `timeout` passes; the current state."""
        end = time.monotonic() + timeout
        while True:
            self.expire()
            with self._changed:
                a = self._get(id)
                left = end - time.monotonic()
                if a is None or a.state not in ("pending", "running") or left <= 0:
                    return a
                self._changed.wait(min(left, max(0.05, a.deadline - time.time()), 1.0))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _approval(row) -> Approval:
    (id, tenant, pid, tool, args, state, created, deadline, decided_at, decided_by, reason, result) = row
    return Approval(id, tenant, pid, tool, json.loads(args), state, created, deadline, decided_at, decided_by,
                    reason, json.loads(result) if result else None)
