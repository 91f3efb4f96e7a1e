"""API keys: who a caller is (tenant), how urgent its requests may be, its share of the
engine and its limits. Stored in SQLite under $LLMOS_HOME with only a hash of each key,
so the full key is shown once, when it is made. Every request reads the store, so a key
revoked from the command line stops working on the running server at once."""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from llmos.errors import InvalidRequestError
from llmos.validate import integer, number

KEY_PREFIX = "sk-llmos-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    priority INTEGER NOT NULL,
    weight REAL NOT NULL,
    rpm INTEGER,
    tpm INTEGER,
    max_concurrent INTEGER,
    admin INTEGER NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
)"""


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant: str
    priority: int                 # the most urgent (lowest) priority this key's requests may ask for
    weight: float                 # the tenant's share under fair scheduling
    rpm: int | None               # requests per minute
    tpm: int | None               # prompt + completion tokens per minute
    max_concurrent: int | None    # requests in flight at once
    admin: bool                   # may see and steer every tenant's requests
    created_at: float
    revoked_at: float | None = None


def hash_key(key: str) -> str:
    # Keys are 256-bit random, so a plain sha256 cannot be brute-forced; no salt or KDF needed.
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)   # hashes only, but nobody else needs to read them
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(self, tenant: str, *, priority: int = 0, weight: float = 1.0, rpm: int | None = None,
               tpm: int | None = None, max_concurrent: int | None = None, admin: bool = False) -> tuple[str, ApiKey]:
        """A new key: returns the full key (never stored) and its record."""
        if not isinstance(tenant, str) or not 0 < len(tenant) <= 128 or not tenant.isprintable():
            raise InvalidRequestError(f"tenant: must be 1-128 printable characters, got {tenant!r}")
        integer("priority", priority, -1000, 1000)
        number("weight", weight, 0, 1e6, lo_open=True)
        for name, v in (("rpm", rpm), ("tpm", tpm), ("max_concurrent", max_concurrent)):
            if v is not None:
                integer(name, v, 1)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        record = ApiKey(f"key-{secrets.token_hex(6)}", tenant, priority, float(weight), rpm, tpm, max_concurrent,
                        bool(admin), time.time())
        with self._lock:
            self._db.execute("INSERT INTO api_keys VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                             (record.id, hash_key(key), tenant, priority, record.weight, rpm, tpm, max_concurrent,
                              int(record.admin), record.created_at, None))
        return key, record

    def lookup(self, key: str) -> ApiKey | None:
        """The live (not revoked) key with this secret, or None."""
        with self._lock:
            row = self._db.execute("SELECT * FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL",
                                   (hash_key(key),)).fetchone()
        return _record(row) if row else None

    def get(self, key_id: str) -> ApiKey | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return _record(row) if row else None

    def list(self, include_revoked: bool = False) -> list[ApiKey]:
        query = "SELECT * FROM api_keys" + ("" if include_revoked else " WHERE revoked_at IS NULL")
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_at").fetchall()
        return [_record(r) for r in rows]

    def revoke(self, key_id: str) -> bool:
        """True if a live key with this id was revoked now."""
        with self._lock:
            cur = self._db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                                   (time.time(), key_id))
        return cur.rowcount == 1


def _record(row: tuple) -> ApiKey:
    (id_, _hash, tenant, priority, weight, rpm, tpm, max_concurrent, admin, created_at, revoked_at) = row
    return ApiKey(id_, tenant, priority, weight, rpm, tpm, max_concurrent, bool(admin), created_at, revoked_at)


def local_key(store: KeyStore, path: Path) -> str:
    """The key `make run` prints: the one saved at `path` if it still works, else a new admin
    key for tenant "default" saved there (readable by its owner only)."""
    if path.is_file():
        saved = path.read_text().strip()
        if store.lookup(saved) is not None:
            return saved
    key, _ = store.create("default", admin=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(key + "\n")
    return key
