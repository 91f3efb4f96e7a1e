"""Storage: each tenant's files, in a directory of its own under one root that no path can
leave. Agents reach it only through fs system calls, so every path they give is hostile
until proven otherwise: it is normalised (the same form capabilities are checked against),
and refused if it is absolute, climbs with "..", or crosses a symlink that leads outside
the tenant's directory, whoever made the link. (Checking and then using a path is not one
atomic step; that is safe because agents have no system call that makes symlinks, so only
someone with the disk in hand could swap one in between.)

Writes are atomic (a temporary file renamed over the target), appends are atomic with
respect to each other, and a tenant's bytes on disk are bounded per file and in total."""

from __future__ import annotations

import errno
import os
import re
import stat as stat_
import tempfile
import threading
from pathlib import Path

from llmos.errors import InvalidRequestError, LLMOSError

MAX_PATH = 1024
_TENANT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


class PathEscape(InvalidRequestError):
    """A path the sandbox refuses: it could reach outside the tenant's storage, or it cannot
    name anything inside it (empty, NUL bytes, too long)."""

    def __init__(self, path, reason: str = "escapes the tenant's storage") -> None:
        shown = path if not isinstance(path, str) or len(path) <= 80 else path[:80] + "..."
        super().__init__(f"path: {shown!r} {reason}")
        self.path = path


class NotFound(LLMOSError):
    """The file or directory a call names does not exist."""


class QuotaExceeded(LLMOSError):
    """A write would make a file larger than the per-file limit, or the tenant's files
    larger than its quota; nothing was written."""


class TenantStorage:
    def __init__(self, root: Path, *, max_file_bytes: int = 16 << 20, quota_bytes: int = 256 << 20) -> None:
        for name, value in (("max_file_bytes", max_file_bytes), ("quota_bytes", quota_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"{name}: must be a positive integer, got {value!r}")
        self.root = Path(root)
        self.max_file_bytes = max_file_bytes
        self.quota_bytes = quota_bytes
        # Temporary files live beside the tenants (same filesystem, so os.replace is atomic)
        # but in no tenant's directory: tenant names cannot start with a dot, so no tenant
        # lists them, counts them against its quota, or collides with them.
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)      # the host's other users never reach a tenant's files
        for leftover in self._tmp.iterdir():       # from writes a crash interrupted
            leftover.unlink(missing_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @staticmethod
    def normalize(path: str) -> str:
        """The canonical relative form of a path: "a/./b//c/" -> "a/b/c", "./x" -> "x", and
        "" or "." -> "" (the tenant's root). Capabilities are checked against this form, so
        one file has one name. Refuses what could never name something inside the tenant's
        storage; symlinks are checked later, against the disk."""
        if not isinstance(path, str):
            raise PathEscape(path, f"must be a string, not {type(path).__name__}")
        if "\0" in path:
            raise PathEscape(path, "contains a NUL byte")
        if len(path) > MAX_PATH:
            raise PathEscape(path, f"is longer than {MAX_PATH} characters")
        if path.startswith("/"):
            raise PathEscape(path, "escapes the tenant's storage: absolute paths are not allowed")
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise PathEscape(path, "escapes the tenant's storage: '..' is not allowed")
        return "/".join(parts)

    # -- files -----------------------------------------------------------------------------
    def read(self, tenant: str, path: str) -> bytes:
        _, _, real = self._locate(tenant, path)
        try:
            with open(real, "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"path: no such file {path!r}") from None
        except IsADirectoryError:
            raise InvalidRequestError(f"path: {path!r} is a directory, not a file") from None

    def write(self, tenant: str, path: str, data: bytes) -> None:
        """Replace the file's contents at once: a reader sees the old bytes or the new, never
        a mix. Creates missing parent directories."""
        data = _as_bytes(data)
        _, _, real = self._locate(tenant, path)
        if len(data) > self.max_file_bytes:
            raise QuotaExceeded(f"path: {path!r}: {len(data)} bytes exceed the per-file limit of "
                                f"{self.max_file_bytes} bytes")
        with self._lock(tenant):
            old = self._file_size(real, path)
            self._check_quota(tenant, len(data) - old)
            self._make_parents(real, path)
            fd, tmp = tempfile.mkstemp(dir=self._tmp)
            try:
                os.fchmod(fd, 0o644)    # readable by the tenant's own jailed uid, through a bind
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, real)
            except BaseException:
                os.unlink(tmp)
                raise

    def append(self, tenant: str, path: str, data: bytes) -> None:
        """Add bytes to the end of the file, creating it if missing. Appends to one tenant
        are serialised, so concurrent appends never interleave."""
        data = _as_bytes(data)
        _, _, real = self._locate(tenant, path)
        with self._lock(tenant):
            size = self._file_size(real, path)
            if size + len(data) > self.max_file_bytes:
                raise QuotaExceeded(f"path: {path!r}: {size + len(data)} bytes would exceed the per-file limit "
                                    f"of {self.max_file_bytes} bytes")
            self._check_quota(tenant, len(data))
            self._make_parents(real, path)
            with open(real, "ab") as f:
                f.write(data)

    def delete(self, tenant: str, path: str) -> None:
        """Remove a file, a symlink (never what it points to) or an empty directory."""
        _, entry, _ = self._locate(tenant, path)
        with self._lock(tenant):
            try:
                if stat_.S_ISDIR(os.lstat(entry).st_mode):
                    os.rmdir(entry)
                else:
                    os.unlink(entry)
            except (FileNotFoundError, NotADirectoryError):
                raise NotFound(f"path: no such file {path!r}") from None
            except OSError as e:
                if e.errno != errno.ENOTEMPTY:
                    raise
                raise InvalidRequestError(f"path: {path!r} is a directory that is not empty") from None

    def list(self, tenant: str, path: str = "") -> list[dict]:
        """The entries of a directory, by name: {name, type "file"|"dir", size (0 for a
        directory), mtime}. Symlinks show as what they point to; those that lead outside the
        tenant's storage, dangle, or point at anything but a file or directory are left out."""
        _, _, real = self._locate(tenant, path, allow_root=True)
        base = self._base(tenant)
        try:
            scan = os.scandir(real)
        except FileNotFoundError:
            raise NotFound(f"path: no such directory {path!r}") from None
        except NotADirectoryError:
            raise InvalidRequestError(f"path: {path!r} is a file, not a directory") from None
        out = []
        with scan:
            for e in scan:
                if e.is_symlink() and not _inside(os.path.realpath(e.path), base):
                    continue
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                kind = _kind(st.st_mode)
                if kind is not None:
                    out.append({"name": e.name, "type": kind, "size": st.st_size if kind == "file" else 0,
                                "mtime": st.st_mtime})
        return sorted(out, key=lambda d: d["name"])

    def stat(self, tenant: str, path: str) -> dict:
        """{path (normalised), type "file"|"dir", size (0 for a directory), mtime}."""
        rel, _, real = self._locate(tenant, path, allow_root=True)
        try:
            st = os.stat(real)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"path: no such file {path!r}") from None
        kind = _kind(st.st_mode)
        if kind is None:
            raise NotFound(f"path: no such file {path!r}")
        return {"path": rel, "type": kind, "size": st.st_size if kind == "file" else 0, "mtime": st.st_mtime}

    def usage(self, tenant: str) -> int:
        """Bytes in the tenant's regular files. Counted from the disk each time, so files
        changed behind the kernel's back are counted too; symlinks count as nothing."""
        total = 0
        for dirpath, _, names in os.walk(self._base(tenant)):
            for name in names:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                if stat_.S_ISREG(st.st_mode):
                    total += st.st_size
        return total

    def resolve(self, tenant: str, path: str) -> str:
        """The host path of one of the tenant's files, checked as every call's path is: how
        the kernel finds a program a tenant stored to run it."""
        _, _, real = self._locate(tenant, path)
        if not os.path.isfile(real):
            raise NotFound(f"path: no such file {path!r} in tenant {tenant!r}'s storage")
        return real

    def base(self, tenant: str) -> str:
        """The real path of the tenant's directory."""
        return self._base(tenant)

    def holds(self, tenant: str, host_path: str) -> bool:
        """Whether a host path lies in the tenant's storage (symlinks resolved)."""
        return _inside(os.path.realpath(host_path), self._base(tenant))

    # -- the sandbox -----------------------------------------------------------------------
    def _base(self, tenant: str) -> str:
        """The real path of the tenant's directory, made on first use."""
        if not isinstance(tenant, str) or not _TENANT_NAME.fullmatch(tenant):
            raise InvalidRequestError(f"tenant: must be 1-128 of A-Z a-z 0-9 _ . - not starting with a dot, "
                                      f"got {tenant!r}")
        base = self.root / tenant
        base.mkdir(parents=True, exist_ok=True)
        return os.path.realpath(base)

    def _locate(self, tenant: str, path: str, *, allow_root: bool = False) -> tuple[str, str, str]:
        """(normalised path, the directory entry it names, what that entry resolves to).
        The entry is the name in its real parent directory (a symlink stays a symlink, for
        delete); both the parent and the resolved target must lie inside the tenant's
        directory, which catches a symlink anywhere on the path."""
        rel = self.normalize(path)
        if not rel and not allow_root:
            raise PathEscape(path, "is empty: it must name a file")
        base = self._base(tenant)
        if not rel:
            return rel, base, base
        parent, name = os.path.split(os.path.join(base, rel))
        parent = os.path.realpath(parent)
        entry = os.path.join(parent, name)
        real = os.path.realpath(entry)
        if not (_inside(parent, base) and _inside(real, base)):
            raise PathEscape(path, "escapes the tenant's storage through a symlink")
        return rel, entry, real

    def _lock(self, tenant: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(tenant, threading.Lock())

    def _file_size(self, real: str, path: str) -> int:
        """The size of the file about to be replaced or extended (0 if none); refuses a
        directory, which a write must never replace."""
        try:
            st = os.stat(real)
        except (FileNotFoundError, NotADirectoryError):
            return 0
        if stat_.S_ISDIR(st.st_mode):
            raise InvalidRequestError(f"path: {path!r} is a directory, not a file")
        return st.st_size

    def _check_quota(self, tenant: str, growth: int) -> None:
        used = self.usage(tenant)
        if used + growth > self.quota_bytes:
            raise QuotaExceeded(f"tenant {tenant!r}: {used} bytes used, {growth} more would exceed the quota of "
                                f"{self.quota_bytes} bytes")

    @staticmethod
    def _make_parents(real: str, path: str) -> None:
        try:
            os.makedirs(os.path.dirname(real), exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise InvalidRequestError(f"path: {path!r}: a parent of it is a file, not a directory") from None


def _inside(real: str, base: str) -> bool:
    return real == base or real.startswith(base + os.sep)


def _kind(mode: int) -> str | None:
    return "file" if stat_.S_ISREG(mode) else "dir" if stat_.S_ISDIR(mode) else None


def _as_bytes(data) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidRequestError(f"data: must be bytes, got {type(data).__name__}")
    return bytes(data)
