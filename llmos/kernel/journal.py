"""Journal: durable execution for agents. Every side effect of an agent is a system call,
so the kernel records each call's outcome per process, in order. A durable process that
restarts runs its program again from the top; its SDK numbers the calls 0, 1, 2, ... from
process start, and for a (pid, seq) the journal already holds, the kernel hands back the
recorded result (or error) instead of running the call again, until the program reaches
new ground. This needs the program to make the same calls in the same order; when it does
not, the journal says so (Nondeterminism) rather than replay the wrong result.

An outcome is committed to SQLite (WAL, synchronous=NORMAL) before the call returns, so it
survives the kernel process crashing; the last few may be lost if the machine itself
loses power. A side effect whose outcome was not yet recorded when the kernel died runs
again on replay: calls are journalled at least once, replayed exactly once.

The caller runs each journalled call as:

    with journal.claim(pid, seq):
        entry = journal.lookup(pid, seq, call, digest(args))
        if entry is None:
            ... run the call, then journal.record(pid, seq, call, digest(args), result=...)
                (or error=... if it failed) ...

`claim` makes a second request for the same (pid, seq) (a retry after a timeout) wait for
the first and then find its recorded outcome, so the side effect cannot run twice."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmos.errors import InvalidRequestError, LLMOSError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    pid INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    call TEXT NOT NULL,
    args_digest TEXT NOT NULL,
    result TEXT NOT NULL,
    error TEXT,
    time REAL NOT NULL,
    PRIMARY KEY (pid, seq)
) WITHOUT ROWID"""


class Nondeterminism(LLMOSError):
    """A durable program's calls no longer match its journal: replaying would hand it the
    result of a different call."""


@dataclass(frozen=True)
class Entry:
    pid: int
    seq: int                  # the call's position among the process's calls, from 0
    call: str                 # e.g. "fs.append"
    args_digest: str          # `digest` of the call's arguments
    result: object            # the JSON value the call returned (None if it failed)
    error: dict | None        # the error it raised, as the caller recorded it; replayed too
    time: float               # when it was recorded (Unix seconds)


def digest(args: dict) -> str:
    """The fingerprint of a call's arguments that replay compares: SHA-256 of their
    canonical JSON, so key order does not matter."""
    return hashlib.sha256(_json("args", args).encode()).hexdigest()


class Journal:
    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
        self._lock = threading.Lock()
        self._claims: dict[tuple[int, int], list] = {}     # (pid, seq) -> [lock, holders and waiters]
        self._claims_guard = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def claim(self, pid: int, seq: int) -> Iterator[None]:
        """Hold (pid, seq) for the duration: another claim of the same step waits until this
        one ends. Steps of one process, and of different processes, do not wait for each
        other."""
        key = _step(pid, seq)
        with self._claims_guard:
            slot = self._claims.setdefault(key, [threading.Lock(), 0])
            slot[1] += 1
        try:
            with slot[0]:
                yield
        finally:
            with self._claims_guard:
                slot[1] -= 1
                if slot[1] == 0:
                    del self._claims[key]

    def lookup(self, pid: int, seq: int, call: str, args_digest: str) -> Entry | None:
        """The recorded outcome of step `seq` of process `pid`, or None if the program has
        reached new ground. Raises Nondeterminism if the step was a different call."""
        _step(pid, seq)
        with self._lock:
            row = self._db.execute("SELECT * FROM journal WHERE pid = ? AND seq = ?", (pid, seq)).fetchone()
        if row is None:
            return None
        entry = _entry(row)
        _same_call(entry, call, args_digest)
        return entry

    def record(self, pid: int, seq: int, call: str, args_digest: str, result=None, error: dict | None = None) -> Entry:
        """Record the outcome of step `seq`; committed when this returns. Recording the same
        outcome again is a no-op; a different one raises Nondeterminism (the call ran
        twice, or the program changed). Returns the entry as stored."""
        _step(pid, seq)
        if not isinstance(call, str) or not call or not isinstance(args_digest, str):
            raise InvalidRequestError(f"call and args_digest: must be strings, got {call!r}, {args_digest!r}")
        if error is not None and not isinstance(error, dict):
            raise InvalidRequestError(f"error: must be a dict or None, got {type(error).__name__}")
        result_json = _json("result", result)
        error_json = None if error is None else _json("error", error)
        now = time.time()
        with self._lock:
            inserted = self._db.execute("INSERT OR IGNORE INTO journal VALUES (?, ?, ?, ?, ?, ?, ?)",
                                        (pid, seq, call, args_digest, result_json, error_json, now)).rowcount
            row = self._db.execute("SELECT * FROM journal WHERE pid = ? AND seq = ?", (pid, seq)).fetchone()
        entry = _entry(row)
        if not inserted:
            _same_call(entry, call, args_digest)
            if (row[4], row[5]) != (result_json, error_json):
                raise Nondeterminism(f"process {pid} step {seq}: {call} is already recorded with a different "
                                     f"outcome; the call ran twice (run each step under Journal.claim)")
        return entry

    def entries(self, pid: int) -> list[Entry]:
        """The process's recorded steps, in order."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM journal WHERE pid = ? ORDER BY seq", (pid,)).fetchall()
        return [_entry(r) for r in rows]

    def prune(self, pid: int) -> int:
        """Forget a process's journal (it exited and will not be replayed); returns how many
        entries went."""
        return self.prune_exited([pid])

    def prune_exited(self, pids: Iterable[int]) -> int:
        """Forget the journals of these processes, in one transaction; returns how many
        entries went."""
        pids = [_natural("pid", pid) for pid in pids]
        with self._lock:
            return self._db.execute("DELETE FROM journal WHERE pid IN (SELECT value FROM json_each(?))",
                                    (json.dumps(pids),)).rowcount

    def size(self) -> int:
        """Entries held, for all processes."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM journal").fetchone()[0]


def _step(pid: int, seq: int) -> tuple[int, int]:
    return _natural("pid", pid), _natural("seq", seq)


def _natural(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"{name}: must be a non-negative integer, got {value!r}")
    return value


def _same_call(entry: Entry, call: str, args_digest: str) -> None:
    where = f"process {entry.pid} step {entry.seq}"
    if entry.call != call:
        raise Nondeterminism(f"{where}: the journal has {entry.call}(...) but the program now calls {call}; "
                             f"a durable program must make the same system calls in the same order")
    if entry.args_digest != args_digest:
        raise Nondeterminism(f"{where}: the journal has {call}(...) with other arguments (digest "
                             f"{entry.args_digest[:12]}) than the program now passes ({args_digest[:12]}); "
                             f"a durable program must make the same system calls with the same arguments")


def _entry(row) -> Entry:
    pid, seq, call, args_digest, result, error, at = row
    return Entry(pid, seq, call, args_digest, json.loads(result), None if error is None else json.loads(error), at)


def _json(name: str, value) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"{name}: must be JSON-serialisable: {e}") from None
