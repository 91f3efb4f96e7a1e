"""The agent side without a real kernel: the SDK's wire format, call numbering, error
mapping and retries, the launcher, and the agent CLI commands, each against a small HTTP
server started here on 127.0.0.1 that answers with canned JSON."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import pytest

from llmos import agent
from llmos.agent import client
from llmos.agent.run import is_entry_point, resolve_program
from llmos.cli import main as cli_main


class FakeServer:
    """Records every request and answers with `respond(method, path, query, body)`, which
    returns (status, payload): a dict or list is sent as JSON, bytes as text with headers."""

    def __init__(self, respond, port: int = 0) -> None:
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True   # headers and body go out in two writes

            def _handle(self):
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw                      # an uploaded file
                req = {"method": self.command, "path": url.path, "query": dict(parse_qsl(url.query)),
                       "body": body, "auth": self.headers.get("Authorization")}
                fake.requests.append(req)
                status, payload, *headers = respond(req["method"], req["path"], req["query"], req["body"])
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(payload, bytes) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers[0] if headers else {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _handle

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def calls(self) -> list[dict]:
        return [r["body"] for r in self.requests if r["path"] == "/v1/sys"]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def syscalls(handlers: dict):
    """A /v1/sys responder from {call: result or function(args) -> result or (status, error)}."""
    def respond(method, path, query, body):
        assert path == "/v1/sys" and method == "POST"
        h = handlers[body["call"]]
        out = h(body["args"]) if callable(h) else h
        if isinstance(out, tuple):
            return out
        return 200, {"result": out}
    return respond


def err(status: int, message: str, code: str | None = None, param: str | None = None):
    return status, {"error": {"message": message, "type": "x", "param": param, "code": code}}


@pytest.fixture
def kernel(monkeypatch):
    """Start a fake kernel and point this test process's SDK at it, as the supervisor would."""
    servers = []

    def start(handlers: dict, agent_file: str = "") -> FakeServer:
        srv = FakeServer(syscalls(handlers))
        servers.append(srv)
        monkeypatch.setenv("LLMOS_URL", srv.url)
        monkeypatch.setenv("LLMOS_TOKEN", "tok-123")
        monkeypatch.setenv("LLMOS_AGENT_FILE", agent_file)
        monkeypatch.setattr(agent, "_conn", None)
        return srv

    yield start
    if agent._conn is not None:
        agent._conn.close()
    for s in servers:
        s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the SDK ----------------------------------------------------------------------------------
def test_calls_carry_the_token_and_are_numbered_from_zero_even_when_they_fail(kernel):
    srv = kernel({"llm.chat": {"text": "hello", "finish_reason": "stop", "prompt_tokens": 3, "output_tokens": 1},
                  "fs.read": lambda a: err(404, f"path: no file {a['path']}", "not_found", "path"),
                  "fs.write": {}})
    assert agent.chat("hi", max_tokens=3, temperature=0) == "hello"
    with pytest.raises(agent.NotFound):
        agent.fs.read("missing.txt")
    agent.fs.write("notes/a.txt", "héllo")
    assert [r["auth"] for r in srv.requests] == ["Bearer tok-123"] * 3
    assert srv.calls() == [
        {"call": "llm.chat", "seq": 0, "args": {"messages": [{"role": "user", "content": "hi"}],
                                                "sampling": {"max_tokens": 3, "temperature": 0}}},
        {"call": "fs.read", "seq": 1, "args": {"path": "missing.txt"}},
        {"call": "fs.write", "seq": 2, "args": {"path": "notes/a.txt",
                                                "data": base64.b64encode("héllo".encode()).decode()}}]


def test_seq_is_unique_across_threads(kernel):
    srv = kernel({"proc.self": {"pid": 1}})
    threads = [threading.Thread(target=lambda: [agent.self() for _ in range(10)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(c["seq"] for c in srv.calls()) == list(range(40))


def test_results_are_unwrapped_into_python_values(kernel):
    msg = {"id": 7, "sender": 3, "sender_name": "boss", "topic": None, "body": {"task": 1}, "sent_at": 12.5,
           "deliveries": 2}
    srv = kernel({"llm.generate": {"text": " world", "finish_reason": "length", "prompt_tokens": 1, "output_tokens": 1},
                  "llm.embed": lambda a: {"embeddings": [[0.5, 1.0]] * (len(a["input"]) if isinstance(a["input"], list)
                                                                        else 1)},
                  "msg.send": {"id": 41}, "msg.recv": {"message": msg}, "msg.ack": {}, "msg.publish": {"delivered": 2},
                  "proc.wait": {"exit_code": 3, "done": True}, "proc.kill": {"ok": True},
                  "proc.ps": {"processes": [{"pid": 1}]},
                  "fs.read": {"data": base64.b64encode(b"\x00\xffbytes").decode()},
                  "fs.list": {"entries": [{"name": "a", "type": "file", "size": 1, "mtime": 0.0}]}})
    assert agent.generate("hello", max_tokens=1) == " world"
    assert agent.embed("one") == [0.5, 1.0]
    assert agent.embed(["a", "b"]) == [[0.5, 1.0], [0.5, 1.0]]
    assert agent.send("worker-1", {"x": 1}) == 41
    m = agent.recv(timeout=5)
    assert m == agent.Message(7, 3, "boss", None, {"task": 1}, 12.5, 2)
    agent.ack(m)
    agent.ack(9)
    assert agent.publish("news", "hi") == 2
    assert agent.wait(5) == 3
    assert agent.kill(5) is True
    assert agent.ps() == [{"pid": 1}]
    assert agent.fs.read("blob") == b"\x00\xffbytes"
    assert agent.fs.list()[0]["name"] == "a"
    args = {c["call"]: c["args"] for c in srv.calls()}
    assert args["msg.send"] == {"to": "worker-1", "body": {"x": 1}, "block": None}
    assert [c["args"] for c in srv.calls() if c["call"] == "msg.ack"] == [{"id": 7}, {"id": 9}]
    assert args["proc.ps"] == {} and args["fs.list"] == {"path": ""}


def test_recv_and_wait_call_again_until_an_answer_or_their_own_timeout(kernel):
    recvs, waits = iter([None, None, {"id": 1, "body": "late"}]), iter([False, False, True])

    def recv(a):
        time.sleep(0.01)   # the kernel's long poll, shortened
        return {"message": next(recvs)}

    srv = kernel({"msg.recv": recv, "proc.wait": lambda a: (lambda d: {"done": d, "exit_code": 0 if d else None})(
                  next(waits))})
    assert agent.recv().body == "late"
    assert agent.wait(9) == 0
    timeouts = [c["args"]["timeout"] for c in srv.calls()]
    assert timeouts == [None] * 6   # None: for ever, the kernel caps each call

    srv = kernel({"msg.recv": lambda a: (time.sleep(min(a["timeout"], 0.05)), {"message": None})[1],
                  "proc.wait": {"done": False, "exit_code": None}})
    t = time.monotonic()
    assert agent.recv(timeout=0.2) is None
    assert agent.wait(3, timeout=0) is None
    assert time.monotonic() - t < 2
    asked = [c["args"]["timeout"] for c in srv.calls()]
    assert asked[0] == pytest.approx(0.2, abs=0.05) and all(0 <= x <= 0.2 for x in asked)
    assert len(asked) < 20   # waits in the kernel, not a busy loop


def test_spawn_sends_a_relative_path_for_the_kernel_to_resolve_beside_the_callers_program(kernel, tmp_path,
                                                                                         monkeypatch):
    srv = kernel({"proc.spawn": {"pid": 12}}, agent_file=str(tmp_path / "team" / "boss.py"))
    assert agent.spawn("worker.py", name="w1", caps=("llm", "msg"), args=[1, "two"], priority=2,
                       max_tokens=500, max_wall=9.5) == 12
    agent.spawn("/abs/elsewhere.py")
    agent.spawn("helpers.agents:main", restart="on-failure", durable=True)
    agent.spawn("sub/w.py", weight=3)
    sent = [c["args"] for c in srv.calls()]
    assert sent[0] == {"path": "worker.py", "name": "w1", "caps": ["llm", "msg"],
                       "args": ["1", "two"], "restart": "never", "durable": False,
                       "limits": {"max_tokens": 500, "max_wall": 9.5}, "priority": 2}
    assert sent[1]["path"] == "/abs/elsewhere.py" and sent[1]["caps"] is None
    assert (sent[2]["path"], sent[2]["restart"], sent[2]["durable"]) == ("helpers.agents:main", "on-failure", True)
    assert sent[3]["path"] == "sub/w.py" and sent[3]["weight"] == 3


def test_spawn_rejects_a_misspelt_limit_before_calling(kernel):
    srv = kernel({})
    with pytest.raises(TypeError, match="max_tokenz"):
        agent.spawn("w.py", max_tokenz=5)
    with pytest.raises(TypeError, match="list"):
        agent.spawn("w.py", args="--verbose")
    assert srv.calls() == []


@pytest.mark.parametrize("status, code, param, cls", [
    (403, "permission_denied", "fs:write:x", agent.PermissionDenied),
    (403, "limit_exceeded", "max_tokens", agent.LimitExceeded),
    (403, "forbidden", None, agent.KernelError),
    (429, "mailbox_full", None, agent.MailboxFull),
    (429, "queue_full", None, agent.KernelError),
    (409, "deadlock", None, agent.DeadlockError),
    (409, "name_taken", "name", agent.KernelError),
    (413, "message_too_large", "body", agent.MessageTooLarge),
    (404, "process_not_found", "pid", agent.NotFound),
    (400, "invalid_value", "path", agent.InvalidArgument),
    (422, None, None, agent.InvalidArgument),
    (401, None, None, agent.AuthError),
    (500, "internal_error", None, agent.KernelError),
    (503, None, None, agent.KernelError),
])
def test_errors_map_to_one_exception_each(status, code, param, cls):
    e = client.error_from_reply(status, {"error": {"message": "why", "type": "t", "param": param, "code": code}})
    assert type(e) is cls and str(e) == "why" and isinstance(e, agent.AgentError)


def test_error_classes_fit_python_idioms_and_carry_what_was_missing(kernel):
    assert issubclass(agent.NotFound, LookupError) and issubclass(agent.InvalidArgument, ValueError)
    assert str(client.error_from_reply(502, "<html>bad gateway</html>")) == "HTTP 502"
    kernel({"fs.write": err(403, "fs.write: missing capability fs:write:x", "permission_denied", "fs:write:x"),
            "llm.chat": err(403, "max_tokens: limit reached", "limit_exceeded", "max_tokens")})
    with pytest.raises(agent.PermissionDenied) as e:
        agent.fs.write("x", b"1")
    assert e.value.capability == "fs:write:x" and "missing capability" in str(e.value)
    with pytest.raises(agent.LimitExceeded) as e:
        agent.chat("hi")
    assert e.value.limit == "max_tokens" and not isinstance(e.value, agent.PermissionDenied)


def test_an_unreachable_kernel_is_retried_until_it_comes_back(monkeypatch):
    port = free_port()
    conn = client.Connection(f"http://127.0.0.1:{port}", "tok")
    started: list[FakeServer] = []
    timer = threading.Timer(0.4, lambda: started.append(FakeServer(syscalls({"proc.self": {"pid": 4}}), port)))
    timer.start()
    try:
        t = time.monotonic()
        assert conn.call("proc.self") == {"pid": 4}
        assert time.monotonic() - t >= 0.3
        assert started[0].calls() == [{"call": "proc.self", "args": {}, "seq": 0}]   # sent once, numbered once
    finally:
        timer.join()
        conn.close()
        for s in started:
            s.close()


def test_a_kernel_that_stays_away_is_a_kernel_error_naming_it(monkeypatch):
    monkeypatch.setattr(client, "RETRY_SECONDS", 0.3)
    url = f"http://127.0.0.1:{free_port()}"
    conn = client.Connection(url, "tok")
    with pytest.raises(agent.KernelError, match=url):
        conn.call("proc.self")
    conn.close()


def test_outside_llmos_a_call_says_how_to_start_the_program(monkeypatch):
    monkeypatch.delenv("LLMOS_URL", raising=False)
    monkeypatch.delenv("LLMOS_TOKEN", raising=False)
    monkeypatch.setattr(agent, "_conn", None)
    with pytest.raises(agent.AgentError, match="llmos run"):
        agent.self()


def test_exit_tells_the_kernel_then_ends_the_process(kernel):
    srv = kernel({"proc.exit": {}})
    with pytest.raises(SystemExit) as e:
        agent.exit(3)
    assert e.value.code == 3 and srv.calls()[0]["args"] == {"code": 3}


def test_importing_the_sdk_is_light():
    code = "import sys, llmos.agent; print(sorted(m for m in ('torch', 'numpy', 'httpx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


# -- the launcher -----------------------------------------------------------------------------
def launch(cwd, *argv, env=None) -> subprocess.CompletedProcess:
    """`python -m llmos.agent.run ARGV` as the supervisor starts it (no LLMOS_AGENT_FILE)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}, **(env or {})}
    return subprocess.run([sys.executable, "-m", "llmos.agent.run", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=30)


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_launcher_runs_a_file_as_main_with_its_directory_on_the_path(tmp_path):
    write(tmp_path / "team" / "helper.py", "GREETING = 'hi from a sibling'\n")
    write(tmp_path / "team" / "prog.py", """
        import os, sys
        import helper
        print(__name__, sys.argv, sys.path[0], os.environ["LLMOS_AGENT_FILE"], helper.GREETING)
    """)
    r = launch(tmp_path, "team/prog.py", "a", "--b")
    prog = str(tmp_path / "team" / "prog.py")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(" ", 1) == ["__main__", f"{[prog, 'a', '--b']} {tmp_path / 'team'} {prog} "
                                                  "hi from a sibling\n"]


@pytest.mark.parametrize("body, status, stderr", [
    ("import sys; sys.exit(3)", 3, ""),
    ("import sys; sys.exit('gave up: no input')", 1, "gave up: no input"),
    ("raise ValueError('bad row 7')", 1, "ValueError: bad row 7"),
    ("print('fine')", 0, ""),
])
def test_launcher_exit_status(tmp_path, body, status, stderr):
    r = launch(tmp_path, str(write(tmp_path / "p.py", body)))
    assert r.returncode == status and stderr in r.stderr
    if "ValueError" in stderr:
        assert "Traceback" in r.stderr


def test_launcher_calls_module_function_and_uses_an_int_result_as_exit_code(tmp_path):
    write(tmp_path / "pkg" / "__init__.py", "")
    write(tmp_path / "pkg" / "jobs.py", """
        import os, sys
        def seven():
            print(sys.argv, repr(os.environ["LLMOS_AGENT_FILE"]))
            return 7
        def nothing():
            return "not an int"
    """)
    r = launch(tmp_path, "pkg.jobs:seven", "x")
    assert r.returncode == 7 and r.stdout == "['pkg.jobs:seven', 'x'] ''\n", r.stderr
    assert launch(tmp_path, "pkg.jobs:nothing").returncode == 0
    r = launch(tmp_path, "pkg.jobs:missing")
    assert r.returncode == 1 and "missing" in r.stderr


def test_launcher_output_reaches_the_log_line_by_line(tmp_path):
    """stdout is a pipe to the supervisor: without line buffering `llmos logs -f` would see
    nothing until the program ends."""
    prog = write(tmp_path / "slow.py", "import time\nprint('started')\ntime.sleep(20)\n")
    p = subprocess.Popen([sys.executable, "-m", "llmos.agent.run", str(prog)], stdout=subprocess.PIPE, text=True)
    try:
        t = time.monotonic()
        assert p.stdout.readline() == "started\n" and time.monotonic() - t < 10
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


def test_launcher_without_a_target_is_a_usage_error(tmp_path):
    r = launch(tmp_path)
    assert r.returncode == 2 and "usage" in r.stderr


def test_a_launched_agent_names_its_sibling_by_a_relative_path_wherever_it_was_started_from(tmp_path):
    srv = FakeServer(syscalls({"proc.spawn": {"pid": 2}, "proc.wait": {"done": True, "exit_code": 0}}))
    try:
        write(tmp_path / "team" / "boss.py", """
            from llmos import agent
            raise SystemExit(agent.wait(agent.spawn("worker.py", args=["job-1"])))
        """)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        r = launch(elsewhere, str(tmp_path / "team" / "boss.py"),
                   env={"LLMOS_URL": srv.url, "LLMOS_TOKEN": "t", "LLMOS_PID": "1"})
        assert r.returncode == 0, r.stderr
        spawn, wait = srv.calls()
        # The kernel resolves it beside the caller's own program (test_agents checks that end to end).
        assert spawn["args"]["path"] == "worker.py" and spawn["args"]["args"] == ["job-1"]
        assert (spawn["seq"], wait["seq"], wait["args"]["pid"]) == (0, 1, 2)
    finally:
        srv.close()


def test_program_paths_resolve_like_the_kernel_expects(tmp_path):
    assert resolve_program("w.py", "/srv/agents") == "/srv/agents/w.py"
    assert resolve_program("../lib/w.py", "/srv/agents") == "/srv/lib/w.py"
    assert resolve_program("/abs/w.py", "/srv/agents") == "/abs/w.py"
    assert resolve_program("pkg.mod:main", "/srv/agents") == "pkg.mod:main"
    odd = write(tmp_path / "a:b.py", "")   # a file whose name holds a colon is still a file
    assert not is_entry_point("a:b.py", str(tmp_path)) and resolve_program("a:b.py", str(tmp_path)) == str(odd)


# -- the CLI ----------------------------------------------------------------------------------
PROC = {"pid": 5, "ppid": None, "name": "boss", "state": "running", "exit_code": None, "reason": None,
        "restarts": 0, "tenant": "team-a", "priority": 0, "weight": 1.0, "caps": ["llm"], "prompt_tokens": 10,
        "output_tokens": 32, "confinement": "jail/rlimits"}


@pytest.fixture
def server(monkeypatch, tmp_path):
    """A fake llmos server for the CLI; `routes` maps "METHOD /path" to a reply or a function
    of the query and body. The API key comes from $LLMOS_HOME/api_key."""
    routes: dict = {}

    def respond(method, path, query, body):
        h = routes.get(f"{method} {path}")
        if h is None:
            return err(404, f"no route {method} {path}", "not_found")
        out = h(query, body) if callable(h) else h
        return out if isinstance(out, tuple) else (200, out)

    srv = FakeServer(respond)
    srv.routes = routes
    home = tmp_path / "home"
    home.mkdir()
    (home / "api_key").write_text("sk-llmos-from-file\n")
    monkeypatch.setenv("LLMOS_HOME", str(home))
    monkeypatch.delenv("LLMOS_API_KEY", raising=False)
    monkeypatch.setenv("LLMOS_URL", srv.url)
    yield srv
    srv.close()


def cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli_main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_uploads_the_program_into_the_tenants_storage_and_spawns_it_from_there(server, capsys, tmp_path,
                                                                                   monkeypatch):
    server.routes["POST /v1/processes"] = (201, {**PROC, "pid": 17})
    for path in ("programs/boss/boss.py", "programs/team/boss.py", "programs/team/lib/helper.py"):
        server.routes[f"PUT /v1/fs/{path}"] = {"path": path, "bytes": 1}
    (tmp_path / "team" / "lib").mkdir(parents=True)
    (tmp_path / "team" / "boss.py").write_text("import helper\n")
    (tmp_path / "team" / "lib" / "helper.py").write_text("X = 1\n")
    (tmp_path / "team" / "__pycache__").mkdir()
    (tmp_path / "team" / "__pycache__" / "boss.cpython-311.pyc").write_bytes(b"\0")
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli(capsys, "run", "team/boss.py", "--name", "boss", "--cap", "llm", "--cap", "msg:send:*",
                       "--max-tokens", "900", "--max-memory", "1GiB", "--max-wall", "30", "--priority", "-2",
                       "--restart", "on-failure", "--durable", "--", "--input", "x.txt")
    assert (code, out) == (0, "17\n")
    upload, spawn = server.requests
    assert (upload["method"], upload["path"], upload["body"]) == ("PUT", "/v1/fs/programs/boss/boss.py",
                                                                   b"import helper\n")
    assert upload["auth"] == spawn["auth"] == "Bearer sk-llmos-from-file"
    assert spawn["body"] == {"path": "programs/boss/boss.py", "name": "boss", "caps": ["llm", "msg:send:*"],
                             "args": ["--input", "x.txt"], "restart": "on-failure", "durable": True,
                             "limits": {"max_tokens": 900, "max_wall": 30.0, "max_memory": 2**30},
                             "weight": 1.0, "priority": -2}
    server.requests.clear()
    cli(capsys, "run", "team/boss.py", "--dir", "team")
    assert [r["path"] for r in server.requests] == ["/v1/fs/programs/team/boss.py",
                                                    "/v1/fs/programs/team/lib/helper.py", "/v1/processes"]
    assert server.requests[-1]["body"]["path"] == "programs/team/boss.py"
    server.requests.clear()
    cli(capsys, "run", "pkg.mod:main")
    assert server.requests[0]["body"]["path"] == "pkg.mod:main" and server.requests[0]["body"]["caps"] is None
    assert server.requests[0]["body"]["cwd"] == str(tmp_path) and "priority" not in server.requests[0]["body"]
    cli(capsys, "run", "team/boss.py", "--host")
    assert server.requests[1]["body"]["path"] == str(tmp_path / "team" / "boss.py")


def test_run_refuses_a_program_outside_its_dir_or_missing(server, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "w.py").write_text("")
    code, _, err = cli(capsys, "run", "w.py", "--dir", "a")
    assert code != 0 and "not inside --dir" in err
    code, _, err = cli(capsys, "run", "missing.py")
    assert code != 0 and "no such file" in err
    assert server.requests == []


def test_run_wait_exits_with_the_programs_code(server, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LLMOS_API_KEY", "sk-llmos-env")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.py").write_text("")
    answers = iter([{"done": False, "exit_code": None, "state": "running"},
                    {"done": True, "exit_code": 4, "state": "exited", "reason": "exit"}])
    server.routes["PUT /v1/fs/programs/x/x.py"] = {"path": "programs/x/x.py", "bytes": 0}
    server.routes["POST /v1/processes"] = (201, PROC)
    server.routes["GET /v1/processes/5/wait"] = lambda q, b: next(answers)
    code, out, _ = cli(capsys, "run", "x.py", "--wait")
    assert code == 4 and out.splitlines()[0] == "5"
    assert [r["query"] for r in server.requests[2:]] == [{"timeout": "20"}] * 2
    assert {r["auth"] for r in server.requests} == {"Bearer sk-llmos-env"}


def test_wait_gives_a_killed_process_a_shell_status(server, capsys):
    server.routes["GET /v1/processes/5/wait"] = {"done": True, "exit_code": -9, "state": "killed", "reason": "killed"}
    code, out, _ = cli(capsys, "wait", "5")
    assert code == 128 + 9 and "killed" in out


def test_ps_prints_a_table_or_json(server, capsys):
    rows = [PROC, {**PROC, "pid": 6, "ppid": 5, "name": "worker", "state": "exited", "exit_code": 0}]
    server.routes["GET /v1/processes"] = {"object": "list", "data": rows}
    code, out, _ = cli(capsys, "ps", "--all")
    header, first, second = out.splitlines()
    assert header.split() == ["PID", "PPID", "NAME", "STATE", "EXIT", "RESTARTS", "TENANT", "PRI", "TOKENS",
                              "CONFINEMENT"]
    assert first.split() == ["5", "-", "boss", "running", "-", "0", "team-a", "0", "42", "jail/rlimits"]
    assert second.split()[:5] == ["6", "5", "worker", "exited", "0"]
    assert server.requests[0]["query"] == {"all": "true"}
    code, out, _ = cli(capsys, "ps", "--json")
    assert code == 0 and json.loads(out) == rows and server.requests[1]["query"] == {"all": "false"}


def test_kill_suspend_resume_print_the_state_and_fail_when_not_ok(server, capsys):
    for action, state, ok in (("kill", "killed", True), ("suspend", "suspended", True), ("resume", "exited", False)):
        server.routes[f"POST /v1/processes/5/{action}"] = {"pid": 5, "action": action, "ok": ok, "state": state}
        code, out, _ = cli(capsys, action, "5")
        assert (code, out) == (0 if ok else 1, f"5: {state}\n")


def test_renice_sends_priority_and_weight(server, capsys):
    server.routes["POST /v1/processes/5/renice"] = lambda q, b: {"pid": 5, "ok": True, "state": "running",
                                                                 "priority": b["priority"], "weight": b["weight"]}
    code, out, _ = cli(capsys, "renice", "5", "--priority", "3", "--weight", "2.5")
    assert code == 0 and server.requests[0]["body"] == {"priority": 3, "weight": 2.5} and "priority 3" in out
    code, _, err_text = cli(capsys, "renice", "5")
    assert code == 2 and "--priority" in err_text


def test_logs_follow_reads_from_the_offset_until_the_process_ends(server, capsys):
    log = b"line 1\nline 2\nline 3\n"
    sizes = iter([7, 14, len(log)])   # how much the process has written at each read
    states = iter(["running", "exited"])

    def logs(q, b):
        size = next(sizes, len(log))
        return 200, log[int(q.get("offset", 0)):size], {"X-Log-Size": str(size)}

    server.routes["GET /v1/processes/5/logs"] = logs
    server.routes["GET /v1/processes/5"] = lambda q, b: {**PROC, "state": next(states)}
    code, out, _ = cli(capsys, "logs", "5", "-f")
    assert code == 0 and out == log.decode()
    offsets = [r["query"]["offset"] for r in server.requests if r["path"].endswith("/logs")]
    assert offsets == ["0", "7", "14"]


def test_send_parses_the_body_and_takes_digits_as_a_pid(server, capsys):
    server.routes["POST /v1/messages"] = {"id": 99, "to": "x"}
    assert cli(capsys, "send", "worker", '{"task": [1, 2]}')[:2] == (0, "99\n")
    cli(capsys, "send", "12", '"hi"')
    assert [r["body"] for r in server.requests] == [{"to": "worker", "body": {"task": [1, 2]}},
                                                    {"to": 12, "body": "hi"}]
    code, _, err_text = cli(capsys, "send", "worker", "{not json")
    assert code == 1 and "not valid JSON" in err_text and len(server.requests) == 2


def test_audit_lists_and_verifies(server, capsys):
    rec = {"id": 1, "time": 1.7e9, "pid": 5, "tenant": "team-a", "call": "fs.write", "allowed": False,
           "reason": "missing capability fs:write:x", "outcome": "denied", "duration": 0.0012, "args_digest": "ab"}
    server.routes["GET /v1/audit"] = {"object": "list", "data": [rec]}
    code, out, _ = cli(capsys, "audit", "--pid", "5", "--denied", "--limit", "10")
    assert code == 0 and "fs.write" in out and "DENIED (missing capability fs:write:x)" in out and "1.2" in out
    assert server.requests[0]["query"] == {"pid": "5", "denied": "true", "limit": "10"}
    assert json.loads(cli(capsys, "audit", "--json")[1]) == [rec]
    server.routes["GET /v1/audit/verify"] = {"ok": True, "checked": 120, "first_bad": None, "problem": None}
    code, out, _ = cli(capsys, "audit", "verify")
    assert code == 0 and "120" in out
    server.routes["GET /v1/audit/verify"] = {"ok": False, "checked": 40, "first_bad": 37, "problem": "hash mismatch"}
    code, out, _ = cli(capsys, "audit", "verify")
    assert code == 1 and "37" in out and "hash mismatch" in out


def test_server_errors_and_an_absent_server_are_one_line_each(server, capsys, monkeypatch):
    code, out, err_text = cli(capsys, "kill", "999")
    assert (code, out) == (1, "") and err_text == "llmos: error: no route POST /v1/processes/999/kill\n"
    url = f"http://127.0.0.1:{free_port()}"
    code, _, err_text = cli(capsys, "ps", "--url", url)
    assert code == 1 and url in err_text and "Traceback" not in err_text
    code, _, err_text = cli(capsys, "run", "x.py", "--max-memory", "lots")
    assert code == 2 and "expected a size" in err_text
    code, _, err_text = cli(capsys, "run", "x.py", "--restart", "sometimes")
    assert code == 2


def test_double_dash_belongs_to_run_only(server, capsys):
    server.routes["POST /v1/messages"] = {"id": 1}
    assert cli(capsys, "send", "--", "worker", '"x"')[0] == 0   # argparse's own meaning elsewhere
    assert server.requests[0]["body"] == {"to": "worker", "body": "x"}
