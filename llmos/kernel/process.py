"""The process table: one durable row per agent, like xv6's `proc[]` but in SQLite, so the
kernel can restart and still know every agent it ran, what each was allowed and what it used.

A pid is llmos' own (never the OS's): it comes from an AUTOINCREMENT key and is never reused,
so a message, an audit record or a wait that names pid 7 can never reach a later stranger.
The OS pid of the agent's current run is kept beside it, with its start time, to recognise
that very OS process again after a kernel restart.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any, Iterable

from llmos.errors import InvalidRequestError, LLMOSError


class ProcessState(str, Enum):
    STARTING = "starting"      # row made, OS process not yet running (or waiting to restart)
    RUNNING = "running"
    BLOCKED = "blocked"        # inside a blocking system call: recv, wait, llm
    WAITING_APPROVAL = "waiting-approval"   # a tool call waits for a person's approve or deny
    SUSPENDED = "suspended"    # stopped by SIGSTOP; its LLM requests leave the KV pool
    EXITED = "exited"          # ended on its own with status 0
    KILLED = "killed"          # ended by llmos: a kill, a shutdown, or a limit llmos enforces
    FAILED = "failed"          # ended on its own with an error, was lost, or gave up restarting

    @property
    def live(self) -> bool:
        return self in _LIVE


_LIVE = frozenset({ProcessState.STARTING, ProcessState.RUNNING, ProcessState.BLOCKED, ProcessState.WAITING_APPROVAL,
                   ProcessState.SUSPENDED})
RESTART_POLICIES = ("never", "on-failure", "always")


class LimitExceeded(LLMOSError):
    """A process asked for more than it may have: a child wider than its parent's limits, or
    one child more than max_children. `limit` names the limit."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(f"{limit}: {message}")
        self.limit = limit


class NameTaken(InvalidRequestError):
    """Another live process of the same tenant already has this name."""


class NoSuchProcess(LLMOSError, LookupError):
    """No process has this pid."""


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequestError(f"{name}: must be a positive integer, got {value!r}")
    return value


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"{name}: must be a non-negative integer, got {value!r}")
    return value


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name}: must be an integer, got {value!r}")
    return value


def _positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise InvalidRequestError(f"{name}: must be a positive number, got {value!r}")
    return float(value)


def _text(name: str, value: Any, max_len: int = 128) -> str:
    if not isinstance(value, str) or not value or len(value) > max_len or "\0" in value:
        raise InvalidRequestError(f"{name}: must be a non-empty string of at most {max_len} characters, got {value!r}")
    return value


def _strings(name: str, value: Any, max_len: int = 4096) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidRequestError(f"{name}: must be a list of strings, got {value!r}")
    items = list(value)
    for i, item in enumerate(items):
        if not isinstance(item, str) or len(item) > max_len or "\0" in item:
            raise InvalidRequestError(f"{name}[{i}]: must be a string of at most {max_len} characters "
                                      f"without NUL, got {item!r}")
    return items


_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _name(value: Any) -> str:
    # Names address mailboxes beside pids, so one made only of digits would be ambiguous.
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value.isdigit():
        raise InvalidRequestError(f"name: must be 1-64 characters of letters, digits, '_', '.', '-' and "
                                  f"not only digits, got {value!r}")
    return value


def _restart(value: Any) -> str:
    if value not in RESTART_POLICIES:
        raise InvalidRequestError(f"restart: must be one of {', '.join(RESTART_POLICIES)}, got {value!r}")
    return value


def _state(value: Any) -> ProcessState:
    try:
        return ProcessState(value)
    except ValueError:
        raise InvalidRequestError(f"state: must be one of {', '.join(s.value for s in ProcessState)}, "
                                  f"got {value!r}") from None


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name}: must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class Limits:
    """What a process may consume. None means no bound of its own; a child's limits are
    checked against its parent's with `narrow`, so a subtree never outgrows its root."""

    max_tokens: int | None = None      # LLM tokens (prompt + output) over its whole life
    kv_quota: int | None = None        # KV blocks its running requests may hold at once
    max_wall: float | None = None      # seconds of wall-clock time per run
    max_memory: int | None = None      # bytes of address space (RLIMIT_AS)
    max_cpu: int | None = None         # CPU seconds per run (RLIMIT_CPU)
    max_children: int | None = None    # live children at once
    max_pids: int | None = None        # OS processes and threads at once (a cgroup's pids.max, else RLIMIT_NPROC)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "max_wall":
                object.__setattr__(self, f.name, _positive_number(f.name, value))
            elif f.name == "max_children":
                _count(f.name, value)
            else:
                _positive_int(f.name, value)

    @classmethod
    def from_dict(cls, data: Any, base: Limits | None = None) -> Limits:
        """Limits from JSON; fields the dict leaves out take `base`'s values, so a child that
        names one limit inherits the rest from its parent."""
        if not isinstance(data, dict):
            raise InvalidRequestError(f"limits: must be an object, got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequestError(f"limits: unknown field {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return cls(**{**(asdict(base) if base else {}), **data})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def narrow(parent: Limits, child: Limits) -> Limits:
        """`child` if it asks for no more than `parent` in every limit; a larger number, or no
        bound where the parent has one, raises LimitExceeded naming the limit."""
        for f in fields(Limits):
            mine, theirs = getattr(parent, f.name), getattr(child, f.name)
            if mine is None:
                continue
            if theirs is None:
                raise LimitExceeded(f.name, f"the parent is bounded to {mine:g}; a child may not be unbounded")
            if theirs > mine:
                raise LimitExceeded(f.name, f"asked for {theirs:g}, more than the parent's {mine:g}")
        return child


@dataclass
class Process:
    """One row of the process table. While a restart is pending the row stays live (state
    starting), keeping its pid and name, and exit_code/reason say how the last run ended."""

    pid: int
    ppid: int | None
    name: str
    tenant: str
    key_id: str | None
    argv: list[str]             # the program (a path or module:function), then its arguments
    cwd: str
    state: ProcessState
    exit_code: int | None       # -N when a signal N ended it, as subprocess reports
    reason: str | None          # "exit", "exit 3", "signal 11", "killed", "max_wall", "lost", ...
    priority: int
    weight: float
    caps: list[str]
    limits: Limits
    restart: str                # "never" | "on-failure" | "always"
    restarts: int
    durable: bool
    created: float
    started: float | None
    ended: float | None
    os_pid: int | None
    os_start: int | None        # /proc/<os_pid>/stat field 22: tells that OS process from a reuse
    prompt_tokens: int
    output_tokens: int
    syscalls: int
    messages: int
    cpu_seconds: float
    peak_rss: int               # bytes
    confinement: str | None = None   # how its current run is confined: "jail/cgroup", "jail/rlimits", "none"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d


_SCHEMA = """
CREATE TABLE IF NOT EXISTS processes (
    pid INTEGER PRIMARY KEY AUTOINCREMENT,
    ppid INTEGER, name TEXT, tenant TEXT NOT NULL, key_id TEXT,
    argv TEXT NOT NULL, cwd TEXT NOT NULL, state TEXT NOT NULL, exit_code INTEGER, reason TEXT,
    priority INTEGER NOT NULL, weight REAL NOT NULL, caps TEXT NOT NULL, limits TEXT NOT NULL,
    restart TEXT NOT NULL, restarts INTEGER NOT NULL DEFAULT 0, durable INTEGER NOT NULL,
    created REAL NOT NULL, started REAL, ended REAL, os_pid INTEGER, os_start INTEGER,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
    syscalls INTEGER NOT NULL DEFAULT 0, messages INTEGER NOT NULL DEFAULT 0,
    cpu_seconds REAL NOT NULL DEFAULT 0, peak_rss INTEGER NOT NULL DEFAULT 0,
    token_hash TEXT, confinement TEXT);
CREATE TABLE IF NOT EXISTS tenants (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL UNIQUE);
CREATE UNIQUE INDEX IF NOT EXISTS live_name ON processes(tenant, name)
    WHERE state IN ('starting', 'running', 'blocked', 'suspended');
CREATE UNIQUE INDEX IF NOT EXISTS by_token ON processes(token_hash) WHERE token_hash IS NOT NULL;
CREATE INDEX IF NOT EXISTS by_parent ON processes(ppid);
"""
_LIVE_SQL = "state IN (" + ", ".join(f"'{s.value}'" for s in sorted(_LIVE)) + ")"
_COLUMNS = [f.name for f in fields(Process)]
_JSON = {"argv", "caps", "limits"}
_USAGE = ("prompt_tokens", "output_tokens", "syscalls", "messages", "cpu_seconds", "peak_rss")

# What update() accepts, each with its check; pid, tenant and the usage counters never change
# through it (usage only grows, through add_usage).
_UPDATABLE = {
    "name": _name,
    "state": _state,
    "exit_code": lambda v: v if v is None else _integer("exit_code", v),
    "reason": lambda v: v if v is None else _text("reason", v, 256),
    "priority": lambda v: _integer("priority", v),
    "weight": lambda v: _positive_number("weight", v),
    "caps": lambda v: _strings("caps", v, 256),
    "limits": lambda v: v if isinstance(v, Limits) else Limits.from_dict(v),
    "restart": _restart,
    "restarts": lambda v: _count("restarts", v),
    "durable": lambda v: _bool("durable", v),
    "started": lambda v: v if v is None else float(v),
    "ended": lambda v: v if v is None else float(v),
    "os_pid": lambda v: v if v is None else _positive_int("os_pid", v),
    "os_start": lambda v: v if v is None else _count("os_start", v),
    "confinement": lambda v: v if v is None else _text("confinement", v, 64),
}


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _program_stem(program: str) -> str:
    """'agents/researcher.py' -> 'researcher', 'pkg.agents:main' -> 'main', 'pkg.mod' -> 'mod'."""
    stem = Path(program).stem if program.endswith(".py") or "/" in program \
        else program.replace(":", ".").rsplit(".", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.")[:50] or "agent"


class ProcessTable:
    """The durable process table. Every method commits before it returns; one connection is
    shared by all server threads behind a lock (SQLite in WAL mode serialises writers anyway)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._rows: dict[int, Process] = {}      # rows as last read; every write here drops its pid's
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(processes)")}
            if "confinement" not in columns:          # a table from before agents were confined
                self._db.execute("ALTER TABLE processes ADD COLUMN confinement TEXT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(self, *, tenant: str, argv: list[str], cwd: str, name: str | None = None, ppid: int | None = None,
               key_id: str | None = None, caps: Iterable[str] = (), limits: Limits = Limits(), priority: int = 0,
               weight: float = 1.0, restart: str = "never", durable: bool = False) -> Process:
        """A new row in state starting. Without a name it is called '<program stem>-<pid>'."""
        _text("tenant", tenant)
        argv = _strings("argv", argv)
        if not argv or not argv[0]:
            raise InvalidRequestError(f"argv: must start with the program to run, got {argv!r}")
        _text("cwd", cwd, 4096)
        if name is not None:
            _name(name)
        if ppid is not None:
            _positive_int("ppid", ppid)
        if key_id is not None:
            _text("key_id", key_id)
        caps = _strings("caps", caps, 256)
        if not isinstance(limits, Limits):
            raise InvalidRequestError(f"limits: must be Limits, got {limits!r}")
        row = {"ppid": ppid, "name": name, "tenant": tenant, "key_id": key_id, "argv": json.dumps(argv),
               "cwd": cwd, "state": ProcessState.STARTING.value, "priority": _integer("priority", priority),
               "weight": _positive_number("weight", weight), "caps": json.dumps(caps),
               "limits": json.dumps(limits.to_dict()), "restart": _restart(restart),
               "durable": int(_bool("durable", durable)), "created": time.time()}
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                cur = self._db.execute(f"INSERT INTO processes ({', '.join(row)}) VALUES "
                                       f"({', '.join('?' * len(row))})", list(row.values()))
                pid = cur.lastrowid
                if name is None:
                    name = f"{_program_stem(argv[0])}-{pid}"
                    self._db.execute("UPDATE processes SET name = ? WHERE pid = ?", (name, pid))
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                raise NameTaken(f"name: {name!r} is taken by a live process of tenant {tenant!r}") from None
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            return self.get(pid)

    def get(self, pid: int) -> Process | None:
        """The row, from memory when this table wrote it last: the syscall gate reads it on
        every call, and a SQLite read was a tenth of a message's cost."""
        if not isinstance(pid, int) or not 0 < pid < 2**63:   # SQLite's integers end there
            return None
        with self._lock:
            row = self._rows.get(pid)
            if row is None:
                row = self._one("SELECT * FROM processes WHERE pid = ?", (pid,))
                if row is not None:
                    self._rows[pid] = row
            return None if row is None else copy.copy(row)

    def by_name(self, tenant: str, name: str) -> Process | None:
        """The live process of that name, or else the most recent one that had it."""
        return self._one(f"SELECT * FROM processes WHERE tenant = ? AND name = ? "
                         f"ORDER BY {_LIVE_SQL} DESC, pid DESC LIMIT 1", (tenant, name))

    def list(self, tenant: str | None = None, include_exited: bool = False) -> list[Process]:
        where, args = [], []
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        if not include_exited:
            where.append(_LIVE_SQL)
        sql = "SELECT * FROM processes" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY pid"
        return self._many(sql, args)

    def children(self, pid: int) -> list[Process]:
        return self._many("SELECT * FROM processes WHERE ppid = ? ORDER BY pid", (pid,))

    def descendants(self, pid: int) -> list[Process]:
        """Children, their children and so on, in pid order (a parent before its children)."""
        return self._many("WITH RECURSIVE sub(pid) AS (SELECT pid FROM processes WHERE ppid = ? "
                          "UNION SELECT p.pid FROM processes p JOIN sub ON p.ppid = sub.pid) "
                          "SELECT * FROM processes WHERE pid IN sub ORDER BY pid", (pid,))

    def update(self, pid: int, **changes: Any) -> Process:
        values = {}
        for key, value in changes.items():
            check = _UPDATABLE.get(key)
            if check is None:
                raise InvalidRequestError(f"{key}: not a field update() may change")
            value = check(value)
            if key in _JSON:
                value = json.dumps(value.to_dict() if isinstance(value, Limits) else value)
            elif isinstance(value, Enum):
                value = value.value
            elif isinstance(value, bool):
                value = int(value)
            values[key] = value
        with self._lock:
            self._rows.pop(pid, None)
            if values:
                try:
                    self._db.execute(f"UPDATE processes SET {', '.join(f'{k} = ?' for k in values)} WHERE pid = ?",
                                     [*values.values(), pid])
                except sqlite3.IntegrityError:
                    raise NameTaken(f"name: {changes.get('name')!r} is taken by a live process of this "
                                    f"tenant") from None
            proc = self.get(pid)
            if proc is None:
                raise NoSuchProcess(f"no process {pid}")
            return proc

    def add_usage(self, pid: int, **deltas: int | float) -> None:
        """Adds to the usage counters in one statement, so concurrent callers never lose an
        increment; peak_rss keeps the largest value seen."""
        sets, args = [], []
        for key, value in deltas.items():
            if key not in _USAGE:
                raise InvalidRequestError(f"{key}: not a usage counter; known: {', '.join(_USAGE)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InvalidRequestError(f"{key}: must be a non-negative number, got {value!r}")
            sets.append(f"{key} = max({key}, ?)" if key == "peak_rss" else f"{key} = {key} + ?")
            args.append(value)
        if sets:
            with self._lock:
                self._rows.pop(pid, None)
                self._db.execute(f"UPDATE processes SET {', '.join(sets)} WHERE pid = ?", [*args, pid])

    def tenant_number(self, tenant: str) -> int:
        """A number of the tenant's own, 1, 2, 3... in the order tenants first ran an agent,
        never reused: what its agents' uid is made from."""
        _text("tenant", tenant)
        with self._lock:
            row = self._db.execute("SELECT id FROM tenants WHERE tenant = ?", (tenant,)).fetchone()
            if row is None:           # a write only the first time: this runs at every spawn
                self._db.execute("INSERT OR IGNORE INTO tenants (tenant) VALUES (?)", (tenant,))
                row = self._db.execute("SELECT id FROM tenants WHERE tenant = ?", (tenant,)).fetchone()
            return row[0]

    def issue_token(self, pid: int) -> str:
        """A new secret for the process to prove who it is; only its hash is kept, and issuing
        one revokes the previous."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._db.execute("UPDATE processes SET token_hash = ? WHERE pid = ?", (_hash(token), pid))
        return token

    def revoke_token(self, pid: int) -> None:
        with self._lock:
            self._db.execute("UPDATE processes SET token_hash = NULL WHERE pid = ?", (pid,))

    def by_token(self, token: str) -> Process | None:
        """The live process holding this token, or None."""
        if not isinstance(token, str) or not token:
            return None
        return self._one(f"SELECT * FROM processes WHERE token_hash = ? AND {_LIVE_SQL}", (_hash(token),))

    def _one(self, sql: str, args: Iterable[Any]) -> Process | None:
        with self._lock:
            row = self._db.execute(sql, tuple(args)).fetchone()
        return None if row is None else _from_row(row)

    def _many(self, sql: str, args: Iterable[Any]) -> list[Process]:
        with self._lock:
            rows = self._db.execute(sql, tuple(args)).fetchall()
        return [_from_row(r) for r in rows]


def _from_row(row: sqlite3.Row) -> Process:
    d = {c: row[c] for c in _COLUMNS}
    d["argv"], d["caps"] = json.loads(d["argv"]), json.loads(d["caps"])
    d["limits"] = Limits(**json.loads(d["limits"]))
    d["state"] = ProcessState(d["state"])
    d["durable"] = bool(d["durable"])
    return Process(**d)
