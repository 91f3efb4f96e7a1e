"""The MCP hub against real MCP server processes (tests/mcp_echo_server.py), over stdio and
streamable HTTP: listing, calling, tool errors, servers that die mid-call or hang, and
process hygiene (no zombies, nothing left running)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llmos.errors import InvalidRequestError
from llmos.tools.mcp import MCPError, MCPHub, MCPServerConfig

SERVER = str(Path(__file__).with_name("mcp_echo_server.py"))


def stdio(name: str, *flags: str, **kw) -> MCPServerConfig:
    return MCPServerConfig(name, command=[sys.executable, SERVER, *flags], **kw)


def until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def proc_stat(pid: str) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data.rsplit(b")", 1)[1].split()
    return fields[0].decode(), int(fields[1])


def zombie_children() -> list[str]:
    me = os.getpid()
    return [p for p in os.listdir("/proc") if p.isdigit() and (proc_stat(p) or ("", 0)) == ("Z", me)]


def marked_processes(mark: str) -> list[str]:
    """Live processes whose environment carries MCP_TEST_MARK=mark (zombies have none)."""
    found = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"MCP_TEST_MARK={mark}".encode() in Path(f"/proc/{p}/environ").read_bytes().split(b"\0"):
                found.append(p)
        except OSError:
            pass
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HTTPServer:
    """The echo server over streamable HTTP on a fixed loopback port, restartable."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, SERVER, "--http", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert until(self._listening, 20), "the HTTP MCP server did not start"

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.2).close()
            return True
        except OSError:
            return False

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def hub():
    hub = MCPHub([stdio("echo")], list_timeout=20)
    hub.start()
    yield hub
    hub.close()


@pytest.fixture
def http_server():
    server = HTTPServer()
    server.start()
    yield server
    server.kill()


def test_config_is_validated():
    for bad in ["", "a.b", "a b", "ö", None]:
        with pytest.raises(InvalidRequestError, match="name"):
            MCPServerConfig(bad, command=["x"])
    with pytest.raises(InvalidRequestError, match="exactly one"):
        MCPServerConfig("s")
    with pytest.raises(InvalidRequestError, match="exactly one"):
        MCPServerConfig("s", command=["x"], url="http://localhost/mcp")
    with pytest.raises(InvalidRequestError, match="command"):
        MCPServerConfig("s", command=[])
    with pytest.raises(InvalidRequestError, match="command"):
        MCPServerConfig("s", command="python server.py")
    with pytest.raises(InvalidRequestError, match="url"):
        MCPServerConfig("s", url="ftp://host/mcp")
    with pytest.raises(InvalidRequestError, match="env"):
        MCPServerConfig("s", url="http://localhost/mcp", env={"A": "1"})
    with pytest.raises(InvalidRequestError, match="env"):
        MCPServerConfig("s", command=["x"], env={"A": 1})
    for timeout in [0, -1, float("inf"), "5", True]:
        with pytest.raises(InvalidRequestError, match="timeout"):
            MCPServerConfig("s", command=["x"], timeout=timeout)
    with pytest.raises(InvalidRequestError, match="unique"):
        MCPHub([MCPServerConfig("s", command=["x"]), MCPServerConfig("s", url="http://h/mcp")])


def test_bad_call_names_and_a_hub_not_started():
    hub = MCPHub([MCPServerConfig("s", command=["x"])])
    for name in ["s.add", "mcp.s", "mcp.other.add", "tool.s.add", 3]:
        with pytest.raises(InvalidRequestError, match="name"):
            hub.call(name, {})
    with pytest.raises(InvalidRequestError, match="args"):
        hub.call("mcp.s.add", [1, 2])
    with pytest.raises(MCPError, match="not running"):
        hub.call("mcp.s.add", {})
    assert hub.list_tools() == []
    hub.close()


def test_stdio_server_is_listed_and_called(hub):
    tools = {t.name: t for t in hub.list_tools()}
    assert {"mcp.echo.add", "mcp.echo.echo", "mcp.echo.sleep"} <= set(tools)
    add = tools["mcp.echo.add"]
    assert (add.server, add.tool, add.description) == ("echo", "add", "Add two integers.")
    assert add.input_schema["properties"]["a"]["type"] == "integer"
    assert hub.call("mcp.echo.add", {"a": 2, "b": 3}) == 5
    assert hub.call("mcp.echo.echo", {"text": "hi there"}) == "hi there"
    [status] = hub.status()
    assert status["name"] == "echo" and status["connected"] and status["tools"] == len(tools)


def test_calls_from_many_threads(hub):
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: hub.call("mcp.echo.add", {"a": i, "b": 1}), range(64)))
    assert results == [i + 1 for i in range(64)]


def test_tool_errors_raise_with_the_servers_text(hub):
    with pytest.raises(MCPError, match="mcp.echo.fail failed: .*disk on fire"):
        hub.call("mcp.echo.fail", {"message": "disk on fire"})
    with pytest.raises(MCPError, match="nosuch"):
        hub.call("mcp.echo.nosuch", {})
    with pytest.raises(MCPError, match="no answer within 0.3s"):
        hub.call("mcp.echo.sleep", {"seconds": 5}, timeout=0.3)
    assert hub.call("mcp.echo.add", {"a": 1, "b": 1}) == 2      # the link survives all three


def test_streamable_http_server_is_listed_and_called(http_server):
    hub = MCPHub([MCPServerConfig("web", url=http_server.url)], list_timeout=20)
    hub.start()
    try:
        assert "mcp.web.add" in {t.name for t in hub.list_tools()}
        assert hub.call("mcp.web.add", {"a": 2, "b": 3}) == 5
        with pytest.raises(MCPError, match="oops"):
            hub.call("mcp.web.fail", {"message": "oops"})
        assert hub.status()[0]["transport"] == "http"
    finally:
        hub.close()


def call_while_killed(hub: MCPHub, name: str, kill) -> tuple[MCPError, float]:
    """Start a 30 s call, run `kill` half a second in, return the error and when it came."""
    threading.Timer(0.5, kill).start()
    start = time.monotonic()
    with pytest.raises(MCPError) as err:
        hub.call(name, {"seconds": 30}, timeout=20)
    return err.value, time.monotonic() - start


def test_stdio_server_killed_mid_call_fails_fast_and_comes_back():
    mark = uuid.uuid4().hex
    hub = MCPHub([stdio("echo", env={"MCP_TEST_MARK": mark})], list_timeout=20)
    hub.start()
    try:
        pid = hub.call("mcp.echo.pid", {})
        error, took = call_while_killed(hub, "mcp.echo.sleep", lambda: os.kill(pid, signal.SIGKILL))
        assert took < 5 and "died during the call" in str(error)
        assert hub.call("mcp.echo.add", {"a": 2, "b": 3}) == 5       # waits for the reconnect
        assert hub.call("mcp.echo.pid", {}) != pid
        assert hub.status()[0]["restarts"] == 1
        start = time.monotonic()
        with pytest.raises(MCPError, match="died"):
            hub.call("mcp.echo.crash", {}, timeout=20)
        assert time.monotonic() - start < 5
        assert hub.call("mcp.echo.echo", {"text": "back"}) == "back"
        assert (proc_stat(str(pid)) or ("gone",))[0] != "Z"         # the dead server was reaped
    finally:
        hub.close()
    assert until(lambda: not marked_processes(mark), 5)


def test_http_server_killed_mid_call_fails_fast_and_comes_back(http_server):
    hub = MCPHub([MCPServerConfig("web", url=http_server.url)], list_timeout=20, heartbeat=0.5)
    hub.start()
    try:
        assert hub.call("mcp.web.add", {"a": 1, "b": 2}) == 3
        error, took = call_while_killed(hub, "mcp.web.sleep", http_server.kill)
        assert took < 5 and "MCP server web died during the call" in str(error)
        http_server.start()
        assert hub.call("mcp.web.add", {"a": 2, "b": 3}) == 5
        # killed and restarted while idle: the heartbeat notices, and the next call works
        http_server.kill()
        http_server.start()
        assert until(lambda: hub.status()[0]["restarts"] >= 2, 10)
        assert hub.call("mcp.web.echo", {"text": "again"}) == "again"
    finally:
        hub.close()


def test_hanging_servers_cannot_hang_the_kernel():
    mark = uuid.uuid4().hex
    env = {"MCP_TEST_MARK": mark}
    hub = MCPHub([stdio("stuck", "--hang", "init", env=env),
                  stdio("mute", "--hang", "list", env=env, timeout=2),
                  stdio("fine", "--raw", env=env)], list_timeout=1.0)
    hub.start()
    try:
        assert until(lambda: hub.status()[2]["connected"], 20)
        start = time.monotonic()        # "stuck" is still in its first attempt: list_tools waits for it
        names = {t.name for t in hub.list_tools()}
        assert time.monotonic() - start < 2.5
        assert names == {"mcp.fine.add", "mcp.fine.echo"}
        start = time.monotonic()
        with pytest.raises(MCPError, match="stuck is not connected"):
            hub.call("mcp.stuck.add", {"a": 1, "b": 2}, timeout=30)
        assert time.monotonic() - start < 2.5
        assert hub.call("mcp.fine.add", {"a": 2, "b": 3}) == 5
        assert until(lambda: "TimeoutError" in (hub.status()[1]["last_error"] or ""), 10)
        start = time.monotonic()
        assert {t.name for t in hub.list_tools()} == names
        assert time.monotonic() - start < 2.5
    finally:
        hub.close()
    assert until(lambda: not marked_processes(mark), 5)


def test_connect_disconnect_cycles_leave_no_processes():
    mark = uuid.uuid4().hex
    config = stdio("raw", "--raw", env={"MCP_TEST_MARK": mark})
    hub = MCPHub([config], list_timeout=10)
    for i in range(100):
        hub.start()
        if i % 2:
            assert hub.call("mcp.raw.add", {"a": i, "b": 1}) == i + 1
        hub.close()
    assert until(lambda: not marked_processes(mark) and not zombie_children(), 5), \
        (marked_processes(mark), zombie_children())
