"""Tamper-evident audit log of system calls.

Every syscall is written before it runs (`begin`: who asked for what, on which arguments,
allowed or denied and why) and its result after (`finish`: outcome and duration), so a call
that took the kernel down with it is still on record. Arguments are kept only as a digest:
the log proves what was asked without holding the tenant's data.

The log is an HMAC-SHA256 chain over events. A begin and a finish are each one event,
numbered 1, 2, 3... in the order they were written (`seq` for a call, `done_seq` for its
result, both on the record's row), and event n's hash is HMAC(key, hash of event n-1 +
canonical JSON of event n). A result is thereby protected exactly as its call is, and
erasing one leaves a hole in the numbering. Records are numbered on their own (1, 2, 3...
without gaps), so a removed row is named by its own id. Without the key (32 random bytes in
a file of mode 0600) nobody can alter or remove a record unseen by `verify`: an altered
field breaks its event's hash, a removed row leaves a gap in record ids, a removed result a
gap in event numbers. While the log is open it also remembers its newest record and event,
so cutting off the tail is seen too; cutting it off while no kernel ran is not (the file
alone holds the head), which is what an outside copy of `count()` is for.

One kernel writes a log at a time; anyone may read it (WAL: readers never block the writer,
and `verify` reads a snapshot of its own so syscalls go on while it checks).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from llmos.errors import InvalidRequestError, LLMOSError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY, seq INTEGER NOT NULL, time REAL NOT NULL, pid INTEGER, tenant TEXT NOT NULL,
    call TEXT NOT NULL, args_digest TEXT NOT NULL, allowed INTEGER NOT NULL, reason TEXT, hash TEXT NOT NULL,
    done_seq INTEGER, outcome TEXT, duration REAL, done_hash TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS audit_seq ON audit (seq);
CREATE UNIQUE INDEX IF NOT EXISTS audit_done_seq ON audit (done_seq);
CREATE INDEX IF NOT EXISTS audit_pid ON audit (pid, id);
CREATE INDEX IF NOT EXISTS audit_tenant ON audit (tenant, id);
"""
# A call event is ("call", *these columns); a result event is ("result", id, done_seq, outcome, duration).
_CALL = "id, seq, time, pid, tenant, call, args_digest, allowed, reason"
_EVENTS = (f"SELECT seq, 'call', {_CALL}, hash FROM audit UNION ALL "
           "SELECT done_seq, 'result', id, done_seq, outcome, duration, NULL, NULL, NULL, NULL, NULL, done_hash "
           "FROM audit WHERE done_seq IS NOT NULL ORDER BY 1")


@dataclass
class AuditRecord:
    id: int
    time: float
    pid: int | None
    tenant: str
    call: str                 # e.g. "fs.write"
    args_digest: str          # sha256 of the canonical JSON of the arguments
    allowed: bool
    reason: str | None        # why it was denied, e.g. the missing capability
    outcome: str | None       # "ok" or an error class name; None while running (or if it never ended)
    duration: float | None    # seconds
    hash: str                 # the chain's hash of the call event


@dataclass
class VerifyResult:
    ok: bool
    checked: int              # records checked
    first_bad: int | None     # id of the first record altered or removed
    problem: str | None       # e.g. "record 17 was altered", "record 17 is missing"


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)


def digest(args) -> str:
    """sha256 hex of the arguments as canonical JSON (values JSON cannot hold go in as repr)."""
    try:
        text = _canonical(args)
    except TypeError:           # keys of mixed types cannot be sorted
        text = repr(args)
    return hashlib.sha256(text.encode()).hexdigest()


def _load_key(key_path) -> bytes:
    path = Path(key_path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < 32:
            raise LLMOSError(f"audit key {path} holds {len(key)} bytes, fewer than 32") from None
        return key
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key


class AuditLog:
    def __init__(self, path, key_path) -> None:
        self.path = str(path)
        self._key = _load_key(key_path)
        self._lock = threading.Lock()
        self._running: set[int] = set()     # begun by this kernel, result not yet written
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        last_id, last_call, last_result = self._db.execute(
            "SELECT COALESCE(MAX(id), 0), COALESCE(MAX(seq), 0), COALESCE(MAX(done_seq), 0) FROM audit").fetchone()
        self._last_id, self._seq, self._head = last_id, max(last_call, last_result), ""
        if self._seq:
            column, where = ("hash", "seq") if last_call > last_result else ("done_hash", "done_seq")
            self._head = self._db.execute(f"SELECT {column} FROM audit WHERE {where} = ?", (self._seq,)).fetchone()[0]

    def _link(self, prev: str, event: tuple) -> str:
        return hmac.new(self._key, (prev + _canonical(list(event))).encode(), hashlib.sha256).hexdigest()

    def begin(self, pid: int | None, tenant: str, call: str, args, allowed: bool, reason: str | None = None) -> int:
        """Record a syscall before it runs; returns the record id that `finish` takes."""
        args_digest = digest(args)
        pid = None if pid is None else int(pid)
        with self._lock:
            row = (self._last_id + 1, self._seq + 1, time.time(), pid, tenant, call, args_digest, int(bool(allowed)),
                   reason)
            h = self._link(self._head, ("call", *row))
            self._db.execute(f"INSERT INTO audit ({_CALL}, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (*row, h))
            self._last_id, self._seq, self._head = row[0], row[1], h
            self._running.add(row[0])
            return row[0]

    def finish(self, record_id: int, outcome: str | None, duration: float | None) -> None:
        """Record a syscall's result, as a new event in the chain."""
        record_id, duration = int(record_id), None if duration is None else float(duration)
        with self._lock:
            seq = self._seq + 1
            h = self._link(self._head, ("result", record_id, seq, outcome, duration))
            done = self._db.execute("UPDATE audit SET done_seq = ?, outcome = ?, duration = ?, done_hash = ? "
                                    "WHERE id = ? AND done_seq IS NULL",
                                    (seq, outcome, duration, h, record_id)).rowcount
            if not done:
                raise InvalidRequestError(f"record_id: {record_id} is not an audit record awaiting its result")
            self._seq, self._head = seq, h
            self._running.discard(record_id)

    def query(self, pid: int | None = None, tenant: str | None = None, denied: bool | None = None,
              call: str | None = None, since: float | None = None, limit: int = 1000) -> list[AuditRecord]:
        """The newest `limit` records that match every filter given, newest last."""
        conds, params = [], []
        for cond, value in (("pid = ?", pid), ("tenant = ?", tenant), ("call = ?", call), ("time >= ?", since),
                            ("allowed = ?", None if denied is None else int(not denied))):
            if value is not None:
                conds.append(cond)
                params.append(value)
        where = f"WHERE {' AND '.join(conds)}" if conds else ""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM (SELECT id, time, pid, tenant, call, args_digest, allowed, reason, outcome, duration, "
                f"hash FROM audit {where} ORDER BY id DESC LIMIT ?) ORDER BY id", (*params, limit)).fetchall()
        return [AuditRecord(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), *r[7:]) for r in rows]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM audit").fetchone()[0]

    def verify(self) -> VerifyResult:
        """Recompute the chain and name the first record that was altered or removed."""
        with self._lock:      # the snapshot and the remembered head must match
            db = sqlite3.connect(self.path)
            db.execute("BEGIN")
            checked = db.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
            last_id, last_seq, running = self._last_id, self._seq, set(self._running)
        try:
            problems = self._missing_records(db, last_id)
            problems += self._broken_links(db, last_seq, running, explained=bool(problems))
        finally:
            db.close()
        if not problems:
            return VerifyResult(True, checked, None, None)
        first_bad, problem = min(problems, key=lambda p: (p[0] is None, p[0] or 0))
        return VerifyResult(False, checked, first_bad, problem)

    @staticmethod
    def _missing_records(db: sqlite3.Connection, last_id: int) -> list[tuple[int, str]]:
        want = 1
        for (rid,) in db.execute("SELECT id FROM audit ORDER BY id"):
            if rid != want:
                break
            want += 1
        else:
            if want > last_id:
                return []
        return [(want, f"record {want} is missing")]

    def _broken_links(self, db: sqlite3.Connection, last_seq: int, running: set[int],
                      explained: bool) -> list[tuple[int | None, str]]:
        """The first event whose hash does not follow from its predecessor's, and the first gap
        in the event numbers unless missing records (`explained`) account for it."""
        problems, prev, want, gap = [], "", 1, None
        for seq, *event, stored in db.execute(_EVENTS):
            event = event if event[0] == "call" else event[:5]
            rid = event[1]
            if seq != want:
                if not isinstance(seq, int) or not want < seq <= last_seq:    # renumbered
                    problems.append((rid, f"record {rid} was altered"))
                    break
                gap, prev, want = gap or want, None, seq      # the link after a gap cannot be checked
            if prev is not None and self._link(prev, event) != stored:
                problems.append((rid, f"record {rid} was altered"))
                break
            prev, want = stored, want + 1
        else:
            if gap is None and want <= last_seq:
                gap = want
        if gap is not None and not explained:
            # A result was erased: it belonged to a call made before it that now has none and
            # that is not among the calls this kernel knows to be still running.
            ids = [r for (r,) in db.execute("SELECT id FROM audit WHERE done_seq IS NULL AND seq < ? "
                                            "ORDER BY seq DESC", (gap,)) if r not in running][:3]
            if len(ids) == 1:
                problems.append((ids[0], f"record {ids[0]} was altered: its result (event {gap}) was removed"))
            else:
                problems.append((ids[0] if ids else None, f"event {gap} is missing: the result of "
                                 f"{' or '.join(f'record {i}' for i in ids) or 'a record'} was removed"))
        return problems
