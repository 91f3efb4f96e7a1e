"""The tenants' key-value store: small values an agent wants to keep (a cursor, a setting,
a counter) without inventing a file format. One SQLite file (WAL) under $LLMOS_HOME, rows
keyed by (tenant, key), so one tenant never sees another's keys; each tenant is bounded in
keys and bytes, and a put that would cross a bound changes nothing.

Values are JSON. `put` can be conditional (`if_version`), which is what makes a counter or
a lock safe between agents that race: read the version, write only if it is unchanged."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from llmos.errors import InvalidRequestError, LLMOSError
from llmos.kernel.storage import QuotaExceeded

MAX_KEY = 512
_BAD_KEY_CHARS = "*?[\0"          # keys are matched by capability globs: no wildcards in a key


class VersionConflict(LLMOSError):
    """A conditional put found another version than the one it was told to expect."""


class KeyValueStore:
    def __init__(self, path: Path, *, max_keys: int = 100_000, max_bytes: int = 64 << 20,
                 max_value_bytes: int = 1 << 20) -> None:
        self.max_keys, self.max_bytes, self.max_value_bytes = max_keys, max_bytes, max_value_bytes
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS kv (tenant TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,"
                         " version INTEGER NOT NULL, PRIMARY KEY (tenant, key)) WITHOUT ROWID")
        self._lock = threading.Lock()

    @staticmethod
    def check_key(key, name: str = "key") -> str:
        if not isinstance(key, str) or not key or len(key) > MAX_KEY or any(c in key for c in _BAD_KEY_CHARS):
            raise InvalidRequestError(f"{name}: must be a non-empty string of at most {MAX_KEY} characters "
                                      f"without * ? [ or NUL, got {key!r}")
        return key

    def get(self, tenant: str, key: str) -> dict | None:
        """{"value", "version"} or None."""
        self.check_key(key)
        with self._lock:
            row = self._db.execute("SELECT value, version FROM kv WHERE tenant=? AND key=?", (tenant, key)).fetchone()
        return None if row is None else {"value": json.loads(row[0]), "version": row[1]}

    def put(self, tenant: str, key: str, value, if_version: int | None = None) -> int:
        """Store `value`; the key's new version. `if_version` 0 means "only if absent"."""
        self.check_key(key)
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(f"value: must be JSON ({e})") from None
        if len(text.encode()) > self.max_value_bytes:
            raise QuotaExceeded(f"value: {len(text.encode())} bytes, more than the {self.max_value_bytes} a value may hold")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                version = self._put(tenant, key, text, if_version)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return version

    def _put(self, tenant: str, key: str, text: str, if_version: int | None) -> int:
        row = self._db.execute("SELECT length(CAST(value AS BLOB)), version FROM kv WHERE tenant=? AND key=?",
                               (tenant, key)).fetchone()
        old_bytes, version = row if row else (0, 0)
        if if_version is not None and if_version != version:
            raise VersionConflict(f"key: {key!r} is at version {version}, not {if_version}")
        keys, used = self._db.execute("SELECT count(*), coalesce(sum(length(CAST(value AS BLOB))), 0) FROM kv "
                                      "WHERE tenant=?", (tenant,)).fetchone()
        if row is None and keys >= self.max_keys:
            raise QuotaExceeded(f"key: tenant {tenant} already has {keys} keys, its limit")
        if used - old_bytes + len(text.encode()) > self.max_bytes:
            raise QuotaExceeded(f"value: tenant {tenant}'s values would exceed its {self.max_bytes} bytes")
        self._db.execute("INSERT INTO kv VALUES (?,?,?,?) ON CONFLICT(tenant, key) DO UPDATE SET value=excluded.value,"
                         " version=excluded.version", (tenant, key, text, version + 1))
        return version + 1

    def delete(self, tenant: str, key: str) -> bool:
        self.check_key(key)
        with self._lock:
            return self._db.execute("DELETE FROM kv WHERE tenant=? AND key=?", (tenant, key)).rowcount == 1

    def list(self, tenant: str, prefix: str = "", limit: int = 1000) -> list[str]:
        if not isinstance(prefix, str) or len(prefix) > MAX_KEY or any(c in prefix for c in _BAD_KEY_CHARS):
            raise InvalidRequestError(f"prefix: must be a string without * ? [ or NUL, got {prefix!r}")
        with self._lock:
            rows = self._db.execute("SELECT key FROM kv WHERE tenant=? AND key >= ? AND key < ? ORDER BY key LIMIT ?",
                                    (tenant, prefix, prefix + "\U0010ffff", limit)).fetchall()
        return [r[0] for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
