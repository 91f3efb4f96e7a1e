"""The resource monitor behind the dashboard and `llmos top`: the live feed, what each key
may see of it, the memory map, and `llmos top` (once, and interactive in a terminal),
against a real `llmos serve` on the real model."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import threading
import time

import httpx
import pytest

from llmos.server.monitor import Monitor, percentile
from test_server import MODEL, ROOT, ServerProcess


# -- pure parts ------------------------------------------------------------------------------
def test_percentile_interpolates_inside_buckets():
    # 10 observations in (0, 0.1], 10 in (0.1, 1.0]: the median is the first bucket's top,
    # p75 halfway through the second, and an empty histogram has no percentile.
    buckets = {0.1: 10, 1.0: 10, float("inf"): 0}
    assert percentile(buckets, 0.5) == pytest.approx(0.1)
    assert percentile(buckets, 0.75) == pytest.approx(0.55)
    assert percentile({0.1: 0, float("inf"): 0}, 0.5) is None
    # everything past the last finite bound reports that bound, never infinity
    assert percentile({0.1: 0, 1.0: 0, float("inf"): 5}, 0.99) == 1.0


def test_view_hides_other_tenants():
    sample = {
        "tenants": {"a": {"latency": {"ttft": {"p50": 1.0}}}, "b": {"latency": {"ttft": {"p50": 2.0}}}},
        "latency": {"ttft": {"p50": 1.5}},
        "rows": [{"request_id": "ra", "tenant": "a"}, {"request_id": "rb", "tenant": "b"}],
        "memory_map": {"blocks": [0, 1, -1], "owners": [{"request_id": "ra", "tenant": "a"},
                                                       {"request_id": "rb", "tenant": "b"}],
                       "swap": {"entries": [{"request_id": "rb", "tenant": "b", "blocks": 3}]}},
        "requests": {"running": 2},
    }
    a = Monitor.view(sample, "a", admin=False)
    assert [r["request_id"] for r in a["rows"]] == ["ra"]
    assert list(a["tenants"]) == ["a"] and a["latency"] == {"ttft": {"p50": 1.0}}
    assert a["memory_map"]["owners"] == [{"request_id": "ra", "tenant": "a"}, {"request_id": None, "tenant": None}]
    assert a["memory_map"]["blocks"] == [0, 1, -1]           # the pool's use stays visible
    assert a["memory_map"]["swap"]["entries"] == []
    assert a["requests"] == {"running": 2}                    # machine-wide totals stay
    assert Monitor.view(sample, "b", admin=True) is sample
    assert sample["rows"][1]["request_id"] == "rb"            # the view did not change the sample


# -- a real server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_path):
    s = ServerProcess(tmp_path_factory.mktemp("monitor"))
    s.alice = s.create_key("alice")
    s.bob = s.create_key("bob")
    yield s
    assert s.stop() == 0, s.log.read_text()


def _long_chat(server, key: str, max_tokens: int = 2000) -> threading.Thread:
    """A chat that runs until cancelled: the request to watch, suspend and resume."""
    def run():
        with server.http(key) as c:
            c.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": max_tokens, "ignore_eos": True,
                                                 "messages": [{"role": "user", "content": "Write a long story."}]})
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait_row(http: httpx.Client, tenant: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [r for r in http.get("/v1/kernel/requests").json()["data"] if r["tenant"] == tenant]
        if rows and rows[0]["output_tokens"] > 0:
            return rows[0]
        time.sleep(0.2)
    raise AssertionError(f"no running request of {tenant} within {timeout} s")


def _feed(http: httpx.Client, n: int) -> list[tuple[str, dict]]:
    """The first n events of the live feed."""
    events, name = [], None
    with http.stream("GET", "/v1/dashboard/feed") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if len(events) == n:
                    break
    return events


def test_whoami_and_auth(server):
    with server.http() as admin, server.http(server.alice) as alice, server.http("sk-llmos-wrong") as bad:
        me = admin.get("/v1/dashboard/whoami").json()
        assert me["admin"] and me["auth"] and me["model"] == MODEL and MODEL in me["models"]
        me = alice.get("/v1/dashboard/whoami").json()
        assert me == {**me, "tenant": "alice", "admin": False}
        r = bad.get("/v1/dashboard/whoami")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        anonymous = httpx.get(server.url + "/v1/dashboard/whoami").json()   # tells the page to ask for a key
        assert anonymous["auth"] is True and anonymous["tenant"] is None and not anonymous["admin"]
        assert bad.get("/v1/dashboard/feed").status_code == 401
        page = httpx.get(server.url + "/")           # the page itself is public; its data is not
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert httpx.get(server.url + "/dashboard/static/../../app.py").status_code == 404


def test_feed_and_memory_map_per_tenant(server):
    worker = _long_chat(server, server.alice)
    with server.http() as admin, server.http(server.alice) as alice, server.http(server.bob) as bob:
        row = _wait_row(admin, "alice")
        rid = row["request_id"]
        try:
            (hello_name, hello), (name, sample) = _feed(alice, 2)
            assert hello_name == "hello" and hello["interval"] > 0 and hello["history"]
            assert name == "sample" and sample["tokens_per_s"]["output"] >= 0
            assert [r["request_id"] for r in sample["rows"]] == [rid] and list(sample["tenants"]) == ["alice"]
            m = sample["memory_map"]
            mine = [i for i, o in enumerate(m["owners"]) if o["request_id"] == rid]
            assert len(mine) == 1 and m["blocks"].count(mine[0]) > 0
            assert len(m["blocks"]) == m["total"] == sample["kv"]["total"]

            # bob sees the pool in use, but neither alice's row nor her name on a block
            snap = bob.get("/v1/dashboard/snapshot").json()
            assert snap["rows"] == [] and "alice" not in snap["tenants"]
            owners = snap["memory_map"]["owners"]
            assert owners and all(o == {"request_id": None, "tenant": None} for o in owners)
            assert sum(1 for b in snap["memory_map"]["blocks"] if b >= 0) > 0

            # suspended, its KV leaves the pool: the map shows no block of it
            assert admin.post(f"/v1/kernel/requests/{rid}/suspend").json()["state"] == "suspended"
            snap = admin.get("/v1/dashboard/snapshot").json()
            assert [r["state"] for r in snap["rows"] if r["request_id"] == rid] == ["suspended"]
            assert all(o["request_id"] != rid for o in snap["memory_map"]["owners"])
            assert snap["requests"]["suspended"] >= 1
            assert admin.post(f"/v1/kernel/requests/{rid}/resume").json()["ok"]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                snap = admin.get("/v1/dashboard/snapshot").json()
                if any(o["request_id"] == rid for o in snap["memory_map"]["owners"]):
                    break
            else:
                raise AssertionError("resumed request never held blocks again")
            assert snap["latency"]["ttft"]["p50"] is not None and snap["server"]["rss_bytes"] > 0
        finally:
            admin.post(f"/v1/kernel/requests/{rid}/cancel")
            worker.join(30)


def _cli(*args: str, key: str, url: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMOS_API_KEY": key, "LLMOS_URL": url}
    return subprocess.run([sys.executable, "-m", "llmos.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, **kw)


def test_top_once(server):
    worker = _long_chat(server, server.alice)
    with server.http() as admin:
        rid = _wait_row(admin, "alice")["request_id"]
        try:
            r = _cli("top", "--once", "--width", "200", key=server.admin_key, url=server.url)
            assert r.returncode == 0, r.stderr
            assert rid in r.stdout and "tokens/s" in r.stdout and "KV pool" in r.stdout and "alice" in r.stdout
            r = _cli("top", "--once", "--json", key=server.bob, url=server.url)
            assert r.returncode == 0, r.stderr
            data = json.loads(r.stdout)
            assert data["sample"]["rows"] == [] and data["sample"]["kv"]["used"] > 0
        finally:
            admin.post(f"/v1/kernel/requests/{rid}/cancel")
            worker.join(30)
    r = _cli("top", "--once", key=server.admin_key, url="http://127.0.0.1:9")
    assert r.returncode == 1 and "cannot reach the llmos server" in r.stderr


def test_top_keys_act_on_the_selected_request(server):
    """In a terminal: `z` suspends the selected request, `r` resumes it, `c` cancels it, `q` quits."""
    worker = _long_chat(server, server.alice)
    with server.http() as admin:
        rid = _wait_row(admin, "alice")["request_id"]
        env = {**os.environ, "LLMOS_API_KEY": server.alice, "LLMOS_URL": server.url, "COLUMNS": "160",
               "LINES": "40", "TERM": "xterm"}
        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-m", "llmos.cli", "top", "--interval", "0.5"], stdin=slave,
                                stdout=slave, stderr=slave, env=env, cwd=ROOT, close_fds=True)
        os.close(slave)
        screen = bytearray()

        def read_until(text: str, timeout: float = 30) -> None:
            deadline = time.monotonic() + timeout
            while text.encode() not in screen:
                assert time.monotonic() < deadline, f"{text!r} never shown:\n{screen[-3000:].decode(errors='replace')}"
                if select.select([master], [], [], 0.2)[0]:
                    try:
                        screen.extend(os.read(master, 65536))
                    except OSError:
                        break

        def state() -> str:
            return admin.get(f"/v1/kernel/requests/{rid}").json()["state"]

        def press(key: str, action: str, states: set[str]) -> None:
            screen.clear()
            os.write(master, key.encode())
            read_until(f"{action} ->")
            assert state() in states

        try:
            read_until(rid[:20])
            press("z", "suspend", {"suspended"})
            press("r", "resume", {"running", "waiting"})
            os.write(master, b"c")
            read_until("cancel ->")
            worker.join(30)
            assert admin.get(f"/v1/kernel/requests/{rid}").status_code == 404
            os.write(master, b"q")
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            os.close(master)
            admin.post(f"/v1/kernel/requests/{rid}/cancel")
