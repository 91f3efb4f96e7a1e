"""Tamper-evident audit log of system calls.

Every syscall is logged before it runs (`begin`: who asked for what, on which arguments,
allowed or denied and why) and its result after (`finish`: outcome and duration). Arguments
are kept only as a digest: the log proves what was asked without holding the tenant's data.

The log is an HMAC-SHA256 chain over events. A begin and a finish are each one event,
numbered 1, 2, 3... in the order they were logged (`seq` for a call, `done_seq` for its
result, both on the record's row), and event n's hash is HMAC(key, hash of event n-1 +
canonical JSON of event n). A result is thereby protected exactly as its call is, and
erasing one leaves a hole in the numbering. Records are numbered on their own (1, 2, 3...
without gaps), so a removed row is named by its own id. Without the key (32 random bytes in
a file of mode 0600) nobody can alter or remove a record unseen by `verify`: an altered
field breaks its event's hash, a removed row leaves a gap in record ids, a removed result a
gap in event numbers.

Group commit: `begin` and `finish` extend the chain in memory, in order, under one lock, and
queue the write; a flusher thread writes the queue a few milliseconds later as one SQLite
transaction (at once when it holds `max_batch` events, and the call that filled it waits for
that). A syscall thus no longer waits for a commit, and a kernel that crashes loses the
records of its last few milliseconds, the call that took it down perhaps among them; as the
head below is signed only after its batch commits, that loss is not taken for tampering.
`query`, `count` and `verify` write the queue out first, so they see everything logged
before them; `close` writes the rest.

The head: after each batch commits, the chain's head (newest record id, newest event number,
that event's hash) is signed with the same key into a file beside the database (`audit.head`,
replaced atomically), so cutting off the newest rows while no kernel runs is seen too. A
kernel opening the log holds the database to that head: `verify` names the rows cut off the
end, and the kernel goes on numbering after the signed head, so they stay a gap that no later
write heals. A new log is signed as soon as it is opened, so a head missing beside a
non-empty database was removed (or the log is from before head files). That, or an altered
head, cannot be trusted: the kernel starts from the database's own head and writes the
problem into every head it signs, so `verify` reports it after every later start too; to
begin a new log, move audit.db and audit.head aside together. Not seen: both files removed
(that is a new log), or an old copy of the head put back over a database cut to match it
(keep a copy of the head, or of `count()`, elsewhere for that). Neither file is synced to
disk per batch (synchronous=NORMAL), so a power failure, unlike a crash, can leave a head
newer than the rows it signs, which then reads as a cut tail.

One kernel writes a log at a time; anyone may read it (WAL: readers never block the writer,
and `verify` reads a snapshot of its own so syscalls go on while it checks).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llmos.errors import InvalidRequestError, LLMOSError

log = logging.getLogger(__name__)

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
_INSERT = f"INSERT INTO audit ({_CALL}, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_RESULT = ("UPDATE audit SET done_seq = ?, outcome = ?, duration = ?, done_hash = ? "
           "WHERE id = ? AND done_seq IS NULL")


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


@dataclass
class Head:
    """The chain's head as signed into the head file: what the database must still hold."""
    last_id: int              # newest record
    last_seq: int             # newest event
    hash: str                 # that event's hash, which the next event links to
    time: float
    problem: str | None       # what was wrong with the head when a kernel opened the log


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)


def digest(args) -> str:
    """sha256 hex of the arguments as canonical JSON (values JSON cannot hold go in as repr)."""
    try:
        text = _canonical(args)
    except TypeError:           # keys of mixed types cannot be sorted
        text = repr(args)
    return hashlib.sha256(text.encode()).hexdigest()


def _missing(first: int, last: int) -> str:
    return f"record {first} is missing" if first == last else f"records {first}-{last} are missing"


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
    def __init__(self, path, key_path, *, interval: float = 0.005, max_batch: int = 1000) -> None:
        self.path = str(path)
        self.head_path = Path(self.path).with_suffix(".head")
        self._key = _load_key(key_path)
        self._interval, self._max_batch = interval, max_batch
        self._lock = threading.Lock()         # the chain in memory and the queue
        self._db_lock = threading.Lock()      # the connection, the head file and what is committed
        self._calls: list[tuple] = []         # the queue: rows to insert, then results to set
        self._results: list[tuple] = []
        self._running: set[int] = set()       # begun by this kernel, result not yet logged
        self._closed = threading.Event()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        last_id, last_call, last_result = self._db.execute(
            "SELECT COALESCE(MAX(id), 0), COALESCE(MAX(seq), 0), COALESCE(MAX(done_seq), 0) FROM audit").fetchone()
        seq, h = max(last_call, last_result), ""
        if seq:
            column, where = ("hash", "seq") if last_call > last_result else ("done_hash", "done_seq")
            h = self._db.execute(f"SELECT {column} FROM audit WHERE {where} = ?", (seq,)).fetchone()[0]
        # begun by an earlier kernel and never finished: `finish` may still complete them
        self._orphans = {r for (r,) in self._db.execute("SELECT id FROM audit WHERE done_seq IS NULL")}
        signed, self._problem = self._read_head(held=bool(seq))
        if signed is not None:
            last_id = max(last_id, signed.last_id)
            if signed.last_seq > seq:         # the newest events were cut off: number after them
                seq, h = signed.last_seq, signed.hash
        self._last_id, self._seq, self._head = last_id, seq, h
        self._committed = Head(last_id, seq, h, time.time(), self._problem)   # verify's floor
        self._committed_running: frozenset[int] = frozenset()
        if signed is None:      # signed at once, so that a missing head means a removed one
            self._write_head(self._committed)    # and its problem travels with every head after it
        self._wake = threading.Event()           # set when the queue gets its first write
        self._flusher = threading.Thread(target=self._flush_loop, name="llmos-audit-flush", daemon=True)
        self._flusher.start()

    def _link(self, prev: str, event: tuple) -> str:
        return hmac.new(self._key, (prev + _canonical(list(event))).encode(), hashlib.sha256).hexdigest()

    def _sign(self, head: Head) -> str:
        return self._link("head", (head.last_id, head.last_seq, head.hash, head.time, head.problem))

    def begin(self, pid: int | None, tenant: str, call: str, args, allowed: bool, reason: str | None = None) -> int:
        """Log a syscall before it runs; returns the record id that `finish` takes."""
        args_digest = digest(args)
        pid = None if pid is None else int(pid)
        with self._lock:
            row = (self._last_id + 1, self._seq + 1, time.time(), pid, tenant, call, args_digest, int(bool(allowed)),
                   reason)
            h = self._link(self._head, ("call", *row))
            full = self._queue(self._calls, (*row, h))
            self._last_id, self._seq, self._head = row[0], row[1], h
            self._running.add(row[0])
        if full:
            self.flush()
        return row[0]

    def finish(self, record_id: int, outcome: str | None, duration: float | None) -> None:
        """Log a syscall's result, as a new event in the chain."""
        record_id, duration = int(record_id), None if duration is None else float(duration)
        with self._lock:
            awaiting = self._running if record_id in self._running else self._orphans
            if record_id not in awaiting:
                raise InvalidRequestError(f"record_id: {record_id} is not an audit record awaiting its result")
            seq = self._seq + 1
            h = self._link(self._head, ("result", record_id, seq, outcome, duration))
            full = self._queue(self._results, (seq, outcome, duration, h, record_id))
            self._seq, self._head = seq, h
            awaiting.discard(record_id)
        if full:
            self.flush()

    def _queue(self, queue: list, write: tuple) -> bool:
        """Queue a write (holding the lock); True when the queue is full, for the caller to write out."""
        if self._closed.is_set():
            raise LLMOSError("the audit log is closed")
        if not (self._calls or self._results):
            self._wake.set()
        queue.append(write)
        return len(self._calls) + len(self._results) >= self._max_batch

    def _flush_loop(self) -> None:
        while not self._closed.is_set():
            self._wake.wait()
            self._closed.wait(self._interval)   # let the batch gather
            self._wake.clear()
            try:
                self.flush()
            except Exception:                   # e.g. disk full: the batch stays queued
                log.exception("writing the audit log failed; retrying in a second")
                self._wake.set()
                self._closed.wait(1.0)

    def flush(self) -> None:
        """Write every record logged so far in one transaction, then sign the new head."""
        with self._db_lock:
            with self._lock:
                calls, results, self._calls, self._results = self._calls, self._results, [], []
                head = Head(self._last_id, self._seq, self._head, time.time(), self._problem)
                running = frozenset(self._running)
            if not (calls or results):
                return
            try:
                self._db.execute("BEGIN")
                self._db.executemany(_INSERT, calls)
                self._db.executemany(_RESULT, results)    # after the inserts: a result may be of this batch's call
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                with self._lock:
                    self._calls[:0], self._results[:0] = calls, results
                raise
            self._committed, self._committed_running = head, running
            self._write_head(head)

    def close(self) -> None:
        """Write out what is still queued and stop the flusher; the log takes no more records."""
        with self._lock:
            self._closed.set()
        self._wake.set()
        self._flusher.join()
        self.flush()
        self._db.close()

    def _read_head(self, held: bool) -> tuple[Head | None, str | None]:
        """The signed head and the problem to report: the one it carries, or that it is missing
        (while the database `held` records) or was altered."""
        try:
            data = json.loads(self.head_path.read_text())
            head = Head(int(data["last_id"]), int(data["last_seq"]), str(data["hash"]), float(data["time"]),
                        data["problem"])
            if hmac.compare_digest(self._sign(head), str(data["mac"])):
                return head, head.problem
        except FileNotFoundError:
            return None, f"the signed head {self.head_path.name} is missing" if held else None
        except (ValueError, KeyError, TypeError):
            pass
        return None, f"the signed head {self.head_path.name} was altered"

    def _write_head(self, head: Head) -> None:
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        tmp.write_text(json.dumps({**asdict(head), "mac": self._sign(head)}))
        os.replace(tmp, self.head_path)

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
        self.flush()
        with self._db_lock:
            rows = self._db.execute(
                "SELECT * FROM (SELECT id, time, pid, tenant, call, args_digest, allowed, reason, outcome, duration, "
                f"hash FROM audit {where} ORDER BY id DESC LIMIT ?) ORDER BY id", (*params, limit)).fetchall()
        return [AuditRecord(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), *r[7:]) for r in rows]

    def count(self) -> int:
        self.flush()
        with self._db_lock:
            return self._db.execute("SELECT COUNT(*) FROM audit").fetchone()[0]

    def verify(self) -> VerifyResult:
        """Recompute the chain, hold it to the signed head and name the first record altered or removed."""
        self.flush()
        with self._db_lock:      # the snapshot and the committed head must match
            db = sqlite3.connect(self.path)
            db.execute("BEGIN")
            checked = db.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
            head, running = self._committed, self._committed_running
        try:
            problems = self._missing_records(db, head.last_id)
            problems += self._broken_links(db, head.last_seq, running, explained=bool(problems))
        finally:
            db.close()
        if head.problem:
            problems.append((None, head.problem))
        if not problems:
            return VerifyResult(True, checked, None, None)
        first_bad, problem = min(problems, key=lambda p: (p[0] is None, p[0] or 0))
        return VerifyResult(False, checked, first_bad, problem)

    @staticmethod
    def _missing_records(db: sqlite3.Connection, last_id: int) -> list[tuple[int, str]]:
        """The first run of missing record ids: a gap, or the newest ones cut off below the head."""
        want = 1
        for (rid,) in db.execute("SELECT id FROM audit ORDER BY id"):
            if rid != want:
                return [(want, _missing(want, max(want, rid - 1)))]
            want += 1
        if want > last_id:
            return []
        return [(want, f"{_missing(want, last_id)} from the end of the log (the signed head says {last_id})")]

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
