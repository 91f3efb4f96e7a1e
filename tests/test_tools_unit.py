"""The function library's kernel parts without a server: registry, worker pool, approvals
(durable across a restart of the kernel's objects over the same SQLite file), the
key-value store, and the conversation store's paging and durability."""

from __future__ import annotations

import threading
import time
from typing import Literal

import pytest

from llmos.errors import InvalidRequestError
from llmos.kernel.approvals import AlreadyDecided, ApprovalBook, ApprovalDenied
from llmos.kernel.kvstore import KeyValueStore, VersionConflict
from llmos.kernel.storage import QuotaExceeded
from llmos.tools.library import FunctionLibrary
from llmos.tools.pool import ToolBusy, ToolPool, ToolTimeout
from llmos.tools.registry import ToolArgumentError, ToolContext, ToolError, ToolRegistry, from_function

CTX = ToolContext("acme", 7)


def test_schema_and_validation_come_from_the_signature():
    def book(ctx: ToolContext, city: str, nights: int = 1, kind: Literal["hotel", "hostel"] = "hotel") -> str:
        """Book a room.

        Args:
            city: where
            nights: how many nights
        """
        return f"{ctx.tenant}:{city}:{nights}:{kind}"

    t = from_function(book)
    assert t.takes_ctx and t.description == "Book a room."
    assert t.parameters["required"] == ["city"] and "ctx" not in t.parameters["properties"]
    assert t.parameters["properties"]["nights"] == {"default": 1, "description": "how many nights", "type": "integer"}
    assert t.validate({"city": "Oslo"}) == {"city": "Oslo", "nights": 1, "kind": "hotel"}
    with pytest.raises(ToolArgumentError, match=r"nights: .*integer.*; kind: .*'hotel' or 'hostel'"):
        t.validate({"city": "Oslo", "nights": "many", "kind": "tent"})
    with pytest.raises(ToolArgumentError, match="arguments must be an object"):
        t.validate(["Oslo"])
    with pytest.raises(InvalidRequestError, match="needs a type annotation"):
        from_function(lambda x: x, name="untyped")
    reg = ToolRegistry()
    reg.add(t)
    with pytest.raises(InvalidRequestError, match="already registered"):
        reg.add(from_function(book))
    reg.add(from_function(book, name="bo_ok"))
    with pytest.raises(InvalidRequestError, match="look the same to a model"):
        reg.add(from_function(book, name="bo.ok"))
    with pytest.raises(InvalidRequestError, match="tool name"):
        from_function(book, name="bad name!")


def _tool(fn, **kw):
    return from_function(fn, **kw)


def test_pool_replaces_a_hung_worker_and_reports_crashes():
    release = threading.Event()

    def hang() -> str:
        release.wait(30)
        return "late"

    def ok(x: int) -> int:
        return x * 2

    def boom() -> None:
        raise KeyError("missing thing")

    pool = ToolPool(workers=1, default_timeout=0.3)
    try:
        for _ in range(3):                      # one worker, three hangs: each costs only its caller
            with pytest.raises(ToolTimeout, match="no result within 0.3 s"):
                pool.run(_tool(hang), {}, CTX)
        assert pool.run(_tool(ok), {"x": 21}, CTX) == 42
        with pytest.raises(ToolError, match="boom: KeyError: 'missing thing'"):
            pool.run(_tool(boom), {}, CTX)
        assert pool.stats()["stuck"] == 3 and pool.stats()["calls"] == {"timeout": 3, "ok": 1, "error": 1}
        release.set()
        deadline = time.monotonic() + 5
        while pool.stats()["stuck"] and time.monotonic() < deadline:   # stuck workers leave once they return
            time.sleep(0.05)
        assert pool.stats()["stuck"] == 0
    finally:
        release.set()
        pool.shutdown()


def test_pool_enforces_a_tools_concurrency_limit_and_the_stuck_bound():
    gate = threading.Event()

    def slow() -> str:
        gate.wait(10)
        return "done"

    pool = ToolPool(workers=4, default_timeout=5, max_lost=1)
    tool = _tool(slow, max_concurrency=1)
    try:
        t = threading.Thread(target=pool.run, args=(tool, {}, CTX))
        t.start()
        time.sleep(0.2)
        with pytest.raises(ToolBusy, match="already running 1 calls"):
            pool.run(tool, {}, CTX)
        gate.set()
        t.join()
        gate.clear()
        with pytest.raises(ToolTimeout):
            pool.run(_tool(slow), {}, CTX, timeout=0.1)
        with pytest.raises(ToolBusy, match="stuck"):     # past max_lost stuck workers, new calls are refused
            pool.run(_tool(slow), {}, CTX)
    finally:
        gate.set()
        pool.shutdown()


def _library(tmp_path, runs: list) -> FunctionLibrary:
    def pay(amount: int) -> dict:
        runs.append(amount)
        return {"paid": amount}

    reg = ToolRegistry()
    reg.add(from_function(pay, needs_approval=True))
    return FunctionLibrary(reg, ToolPool(2, default_timeout=5), ApprovalBook(tmp_path / "approvals.db"),
                           approval_timeout=60)


def test_a_pending_approval_survives_a_kernel_restart_and_runs_exactly_once(tmp_path):
    runs: list[int] = []
    lib = _library(tmp_path, runs)
    first = lib.call(CTX, "pay", {"amount": 5})
    assert set(first) == {"pending", "state"} and first["state"] == "pending"
    lib.close()                                           # the kernel goes away with the call pending
    lib = _library(tmp_path, runs)                       # ... and comes back over the same file
    again = lib.call(CTX, "pay", {"amount": 5})            # the restarted process repeats its call
    assert again["pending"] == first["pending"]           # the same request, not a second one
    assert [a.id for a in lib.approvals.list("acme", "pending")] == [first["pending"]]
    lib.approvals.decide(first["pending"], True, by="alice")
    results = []
    threads = [threading.Thread(target=lambda: results.append(lib.await_approval(CTX, first["pending"], wait=5)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert runs == [5] and all(r["result"] == {"paid": 5} for r in results)
    assert lib.approvals.get(first["pending"]).state == "done"
    with pytest.raises(AlreadyDecided):
        lib.approvals.decide(first["pending"], False, by="bob")
    with pytest.raises(InvalidRequestError, match="of this process"):
        lib.await_approval(ToolContext("acme", 8), first["pending"])
    lib.close()


def test_denied_and_expired_approvals_refuse_with_the_reason(tmp_path):
    runs: list[int] = []
    lib = _library(tmp_path, runs)
    a = lib.call(CTX, "pay", {"amount": 1})["pending"]
    lib.approvals.decide(a, False, by="alice", reason="too much")
    with pytest.raises(ApprovalDenied, match="denied: too much") as e:
        lib.await_approval(CTX, a)
    assert e.value.approval.decided_by == "alice"
    lib.approval_timeout = 0.2
    b = lib.call(CTX, "pay", {"amount": 2})["pending"]
    t0 = time.monotonic()
    with pytest.raises(ApprovalDenied, match="expired: no decision before the deadline"):
        lib.await_approval(CTX, b, wait=5)
    assert time.monotonic() - t0 < 2 and runs == []
    with pytest.raises(InvalidRequestError, match="only agent processes"):
        lib.call(ToolContext("acme", 0), "pay", {"amount": 3})
    lib.close()


def test_kv_store_versions_quotas_and_isolation(tmp_path):
    kv = KeyValueStore(tmp_path / "kv.db", max_keys=3, max_bytes=200, max_value_bytes=100)
    assert kv.put("a", "k1", {"n": 1}) == 1 and kv.put("a", "k1", {"n": 2}) == 2
    with pytest.raises(VersionConflict, match="version 2, not 1"):
        kv.put("a", "k1", {"n": 3}, if_version=1)
    assert kv.get("a", "k1") == {"value": {"n": 2}, "version": 2} and kv.get("b", "k1") is None
    with pytest.raises(QuotaExceeded, match="bytes"):
        kv.put("a", "big", "x" * 150)
    kv.put("a", "k2", 1)
    kv.put("a", "k3", 1)
    with pytest.raises(QuotaExceeded, match="3 keys"):
        kv.put("a", "k4", 1)
    assert kv.put("b", "k4", 1) == 1                     # another tenant's quota is its own
    for bad in ("", "a*", None, "x" * 600):
        with pytest.raises(InvalidRequestError, match="key"):
            kv.put("a", bad, 1)
    with pytest.raises(InvalidRequestError, match="JSON"):
        kv.put("a", "k1", {1, 2})
    kv.close()
    kv = KeyValueStore(tmp_path / "kv.db")
    assert kv.list("a") == ["k1", "k2", "k3"] and kv.list("a", "k1") == ["k1"]
    kv.close()


def test_tools_and_mcp_servers_in_the_toml_config(tmp_path):
    from llmos.server.settings import load_settings
    good = tmp_path / "good.toml"
    good.write_text('[tools]\nworkers = 3\nhttp_allow_hosts = ["*.example.org"]\n'
                    '[[mcp_servers]]\nname = "files"\ncommand = ["python", "-m", "srv"]\n'
                    '[[mcp_servers]]\nname = "web"\nurl = "http://127.0.0.1:9/mcp"\n')
    s = load_settings(good)
    assert s.tools.workers == 3 and [c.name for c in s.mcp_servers] == ["files", "web"]
    assert "[[mcp_servers]]" in s.to_toml() and 'name = "web"' in s.to_toml()
    for text, message in [('[tools]\nmodules = "x"\n', "tools.modules: must be a list"),
                          ('[tools]\nwokers = 3\n', "unknown setting"),
                          ('[[mcp_servers]]\nname = "a"\n', "exactly one of command"),
                          ('[[mcp_servers]]\nname = "a b"\nurl = "http://x"\n', "letters, digits"),
                          ('[[mcp_servers]]\nname = "a"\nurl = "http://x"\nport = 1\n', "unknown key"),
                          ('[[mcp_servers]]\nname = "a"\nurl = "http://x"\n[[mcp_servers]]\nname = "a"\nurl = "http://y"\n',
                           "unique")]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(InvalidRequestError, match=message):
            load_settings(bad)


def test_http_get_fetches_only_allowed_hosts():
    import http.server
    from llmos.kernel.capabilities import PermissionDenied
    from llmos.tools import builtins

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"x" * 5000 if self.path == "/big" else b"hello from loopback"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    reg = ToolRegistry()
    builtins.install(reg, http_allow_hosts=["127.0.0.1"], http_max_bytes=1000)
    none = ToolRegistry()
    builtins.install(none)
    pool = ToolPool(2, default_timeout=10)
    tool = reg.get("http.get")
    try:
        assert "http.get" not in {t.name for t in none.list()}
        out = pool.run(tool, tool.validate({"url": f"http://127.0.0.1:{server.server_port}/"}), CTX)
        assert out["status"] == 200 and out["text"] == "hello from loopback"
        with pytest.raises(ToolError, match="larger than 1000 bytes"):
            pool.run(tool, tool.validate({"url": f"http://127.0.0.1:{server.server_port}/big"}), CTX)
        with pytest.raises(PermissionDenied, match="localhost"):
            pool.run(tool, tool.validate({"url": f"http://localhost:{server.server_port}/"}), CTX)
        with pytest.raises(InvalidRequestError, match="http"):
            pool.run(tool, tool.validate({"url": "file:///etc/passwd"}), CTX)
    finally:
        pool.shutdown()
        server.shutdown()


def test_clock_and_fs_builtins_act_for_the_caller(tmp_path):
    import datetime
    from llmos.kernel.capabilities import PermissionDenied
    from llmos.kernel.storage import TenantStorage
    from llmos.tools import builtins
    reg = ToolRegistry()
    builtins.install(reg)
    pool = ToolPool(2)
    storage = TenantStorage(tmp_path / "files")
    ctx = ToolContext("acme", 3, ("fs:read:notes/*", "fs:write:notes/*"), {"storage": storage})
    try:
        now = pool.run(reg.get("clock"), {"timezone": "Europe/Paris"}, ctx)
        assert abs(datetime.datetime.fromisoformat(now["iso"]).timestamp() - now["unix"]) < 2
        with pytest.raises(InvalidRequestError, match="unknown time zone"):
            pool.run(reg.get("clock"), {"timezone": "Mars/Olympus"}, ctx)
        pool.run(reg.get("fs.write"), {"path": "notes/a.txt", "content": "hi"}, ctx)
        assert pool.run(reg.get("fs.read"), {"path": "notes/a.txt"}, ctx) == "hi"
        assert (tmp_path / "files" / "acme" / "notes" / "a.txt").read_text() == "hi"
        with pytest.raises(PermissionDenied, match="fs:write:secret.txt"):
            pool.run(reg.get("fs.write"), {"path": "secret.txt", "content": "x"}, ctx)
        with pytest.raises(InvalidRequestError, match="escapes"):
            pool.run(reg.get("fs.read"), {"path": "notes/../../other/x"}, ctx)
    finally:
        pool.shutdown()
