"""The tools every llmos kernel has. Each is a real implementation; each acting for a
process stays inside what that process may do: fs.* checks the same fs capabilities and
the same sandbox as the fs system calls, memory.* the mem capabilities."""

from __future__ import annotations

import datetime as _dt
import time
from fnmatch import fnmatchcase
from urllib.parse import urlsplit

from llmos.errors import InvalidRequestError
from llmos.kernel.capabilities import Capabilities, PermissionDenied, required_for
from llmos.kernel.memory import SHARED, own_scope, visible_scopes
from llmos.tools.calculator import calculate
from llmos.tools.registry import ToolContext, ToolError, ToolRegistry, from_function
from llmos.tools.sandbox import run_python

MAX_FILE_CHARS = 1 << 20


def _require(ctx: ToolContext, call: str, **args) -> None:
    need = required_for(call, **args)
    if need is not None and not Capabilities(ctx.caps).allows(need):
        raise PermissionDenied(call, ctx.pid, need)


def calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression: + - * / // % ** and parentheses, the constants pi
    and e, and sqrt, sin, cos, tan, log, log10, exp, abs, round, min, max, floor, ceil.

    Args:
        expression: the expression, e.g. "2 * (3 + 4) ** 2"
    """
    return calculate(expression)


def clock(timezone: str = "UTC") -> dict:
    """The current date and time.

    Args:
        timezone: an IANA time zone name such as "UTC" or "Europe/Paris"
    """
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
    try:
        tz = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidRequestError(f"timezone: unknown time zone {timezone!r}") from None
    now = _dt.datetime.now(tz)
    return {"iso": now.isoformat(timespec="seconds"), "unix": round(time.time(), 3), "timezone": timezone,
            "weekday": now.strftime("%A")}


def fs_read(ctx: ToolContext, path: str) -> str:
    """Read a text file from your storage.

    Args:
        path: the file's path, relative to your storage root
    """
    _require(ctx, "fs.read", path=path)
    data = ctx.services["storage"].read(ctx.tenant, path)
    if len(data) > MAX_FILE_CHARS:
        raise ToolError(f"fs.read: {path} is {len(data)} bytes, more than {MAX_FILE_CHARS} a tool returns")
    return data.decode("utf-8", errors="replace")


def fs_write(ctx: ToolContext, path: str, content: str) -> dict:
    """Write a text file in your storage, replacing what was there.

    Args:
        path: the file's path, relative to your storage root
        content: the text to write
    """
    _require(ctx, "fs.write", path=path)
    ctx.services["storage"].write(ctx.tenant, path, content.encode())
    return {"path": path, "bytes": len(content.encode())}


def fs_list(ctx: ToolContext, path: str = "") -> list:
    """List a directory of your storage.

    Args:
        path: the directory, relative to your storage root ("" for the root)
    """
    _require(ctx, "fs.list", path=path)
    return ctx.services["storage"].list(ctx.tenant, path)


def fs_delete(ctx: ToolContext, path: str) -> dict:
    """Delete a file from your storage.

    Args:
        path: the file's path, relative to your storage root
    """
    _require(ctx, "fs.delete", path=path)
    ctx.services["storage"].delete(ctx.tenant, path)
    return {"deleted": path}


def memory_remember(ctx: ToolContext, text: str, metadata: dict | None = None, shared: bool = False) -> dict:
    """Store a fact in long-term memory, to be recalled later by meaning.

    Args:
        text: the fact to remember
        metadata: optional key/value labels, usable as a recall filter
        shared: store it in your tenant's shared memory instead of your own
    """
    _require(ctx, "mem.remember", shared=shared)
    scope = SHARED if shared else own_scope(ctx.pid)
    return {"id": ctx.services["memory"].remember(ctx.tenant, scope, text, metadata)}


def memory_recall(ctx: ToolContext, query: str, k: int = 5, filter: dict | None = None) -> list:
    """Find the stored facts most relevant to a query, best first.

    Args:
        query: what to look for
        k: how many items to return (1-100)
        filter: only items whose metadata has these key/value pairs
    """
    _require(ctx, "mem.recall")
    scopes = visible_scopes(ctx.pid, Capabilities(ctx.caps).allows("mem:shared"))
    items = ctx.services["memory"].recall(ctx.tenant, scopes, query, k, filter)
    return [{"id": m.id, "text": m.text, "score": round(m.score, 4), "metadata": m.metadata} for m in items]


def python(ctx: ToolContext, code: str, timeout: float = 10) -> str:
    """Run Python code in a sandboxed process and return what it printed.

    Args:
        code: a Python program; print() what you want back
        timeout: seconds before it is stopped (at most 60)
    """
    if not 0 < timeout <= 60:
        raise InvalidRequestError(f"timeout: must be in (0, 60] seconds, got {timeout}")
    return run_python(code, timeout, hidden_paths=ctx.services.get("hidden_paths", []))


def _http_get(allowed: list[str], max_bytes: int):
    def http_get(url: str) -> dict:
        """Fetch a URL with HTTP GET (only hosts the kernel's configuration allows).

        Args:
            url: an http or https URL
        """
        import httpx
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidRequestError(f"url: must be an http(s) URL with a host, got {url!r}")
        if not any(fnmatchcase(parts.hostname, pattern) for pattern in allowed):
            raise PermissionDenied("http.get", 0, f"host {parts.hostname} (allowed: {', '.join(allowed)})")
        try:
            with httpx.stream("GET", url, timeout=10, follow_redirects=False) as r:
                body = b""
                for chunk in r.iter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise ToolError(f"http.get: response larger than {max_bytes} bytes")
        except httpx.HTTPError as e:
            raise ToolError(f"http.get: {type(e).__name__}: {e}") from None
        return {"status": r.status_code, "content_type": r.headers.get("content-type"),
                "text": body.decode(r.encoding or "utf-8", errors="replace")}
    return http_get


def install(registry: ToolRegistry, *, http_allow_hosts: list[str] = (), http_max_bytes: int = 1 << 20,
            python_timeout: float = 65.0) -> None:
    """Add the built-ins: http.get only when the configuration allows some host."""
    add = registry.add
    add(from_function(calculator, source="builtin", timeout=5))
    add(from_function(clock, source="builtin", timeout=5))
    for name, f in (("fs.read", fs_read), ("fs.write", fs_write), ("fs.list", fs_list), ("fs.delete", fs_delete),
                    ("memory.remember", memory_remember), ("memory.recall", memory_recall)):
        add(from_function(f, name=name, source="builtin"))
    add(from_function(python, source="builtin", timeout=python_timeout, max_concurrency=4))
    if http_allow_hosts:
        add(from_function(_http_get(list(http_allow_hosts), http_max_bytes), name="http.get", source="builtin"))
