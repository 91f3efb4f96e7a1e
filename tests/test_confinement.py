"""Protection: every agent runs confined, so a capability is a wall and not a request. A
real `llmos serve` on the real model; hostile programs stored and spawned with nothing but a
tenant key, as a stranger would; for every wall, the legitimate path beside it too.
(Bad API keys and proxies: test_intrusion.py; the audit log's signed head: test_audit.py.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from test_agents import AgentServer
from test_server import ROOT, wait_for


@pytest.fixture(scope="module")
def srv(tmp_path_factory, default_model_path):
    s = AgentServer(tmp_path_factory.mktemp("confinement"), denial_threshold=50)
    s.key_a, s.key_b, s.key_bomb = s.create_key("team-a"), s.create_key("team-b"), s.create_key("bomber")
    yield s
    assert s.stop() == 0, s.log.read_text()


def store(srv: AgentServer, key: str, path: str, body: str) -> None:
    r = srv.http(key).put(f"/v1/fs/{path}", content=textwrap.dedent(body).encode())
    assert r.status_code == 200, r.text


def run(srv: AgentServer, key: str, path: str, body: str, timeout: float = 120, **spawn) -> tuple[dict, dict, str]:
    """Store `body` in the key's tenant storage, spawn it from there, wait for it: (row when
    spawned, how it ended, its log)."""
    store(srv, key, path, "import json, os, sys, time\nfrom llmos import agent\n" + textwrap.dedent(body))
    r = srv.http(key).post("/v1/processes", json={"path": path, **spawn})
    assert r.status_code == 201, r.text
    proc = r.json()
    return proc, srv.wait(proc["pid"], timeout, key=key), srv.log_of(proc["pid"])


def report(log: str) -> dict:
    return json.loads(next(line for line in log.splitlines() if line.startswith("REPORT "))[len("REPORT "):])


HOSTILE = """
import ctypes, signal, socket
args = json.loads(sys.argv[1])
out = {}

def attempt(name, fn):
    try:
        fn()
        out[name] = ["ok", None]
    except BaseException as e:
        out[name] = [type(e).__name__, getattr(e, "errno", None)]

def read(path):
    with open(path, "rb") as f:
        return f.read(64)

for name, path in args["secrets"].items():
    attempt("read:" + name, lambda path=path: read(path))
for name, path in args["dirs"].items():
    attempt("list:" + name, lambda path=path: out.setdefault("listing:" + name, os.listdir(path)))
attempt("write:host", lambda: open(args["host_file"], "w").write("x"))
attempt("write:tmp", lambda: open(os.path.join("/tmp", os.path.basename(args["host_tmp"])), "w").write("x"))
attempt("write:program_dir", lambda: open("written.txt", "w").write("x"))
attempt("tcp:server", lambda: socket.create_connection(("127.0.0.1", args["server_port"]), timeout=2).close())
attempt("tcp:listener", lambda: socket.create_connection(("127.0.0.1", args["listener_port"]), timeout=2).close())
attempt("signal:server", lambda: os.kill(args["server_pid"], 0))
attempt("signal:other", lambda: os.kill(args["other_pid"], signal.SIGKILL))
attempt("environ:server", lambda: read(f"/proc/{args['server_pid']}/environ"))
attempt("environ:init", lambda: read("/proc/1/environ"))
attempt("mem:init", lambda: read("/proc/1/mem"))
out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
out["uid"] = os.getuid()
libc = ctypes.CDLL(None, use_errno=True)

def syscall(name, *a):
    ctypes.set_errno(0)
    return [getattr(libc, name)(*a), ctypes.get_errno()]

out["ptrace"] = syscall("ptrace", 16, 1, 0, 0)                       # PTRACE_ATTACH to init
out["mount"] = syscall("mount", b"none", b"/mnt", b"tmpfs", 0, None)
out["unshare"] = syscall("unshare", 0x40000000)                      # CLONE_NEWNET
out["own_file"] = agent.fs.read("evil/mine.txt").decode()            # the legitimate path: a system call
print("REPORT " + json.dumps(out), flush=True)
"""


def test_a_hostile_tenant_agent_reaches_nothing_but_its_own_system_calls(srv, tmp_path):
    # Another tenant's agent, running, with a file of its own.
    store(srv, srv.key_b, "secret.txt", "TEAM-B-SECRET")
    other, _, _ = None, None, None
    store(srv, srv.key_b, "sleeper.py", "import time\ntime.sleep(120)\n")
    other = srv.http(srv.key_b).post("/v1/processes", json={"path": "sleeper.py"}).json()
    assert wait_for(lambda: srv.http().get(f"/v1/processes/{other['pid']}").json()["os_pid"], 30)
    other_os_pid = srv.http().get(f"/v1/processes/{other['pid']}").json()["os_pid"]
    store(srv, srv.key_a, "evil/mine.txt", "MINE")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    api_key = Path(os.environ.get("LLMOS_HOME", Path.home() / ".llmos")) / "api_key"
    agents = srv.agents_dir
    secrets = {"shadow": "/etc/shadow", "keys_db": str(srv.keys_db), "api_key": str(api_key),
               "audit_key": str(agents / "audit.key"), "other_tenant_file": str(agents / "files/team-b/secret.txt"),
               "processes_db": str(agents / "processes.db")}
    for name in ("keys_db", "audit_key", "other_tenant_file"):
        assert Path(secrets[name]).exists(), name           # each is there on the host, for the server
    host_tmp = Path("/tmp") / f"llmos-confined-{uuid.uuid4().hex}"
    host_file = Path("/var/lib") / f"llmos-confined-{uuid.uuid4().hex}.txt"    # outside every scratch area
    args = {"secrets": secrets, "dirs": {"agents": str(agents), "other_tenant": str(agents / "files/team-b")},
            "host_file": str(host_file), "host_tmp": str(host_tmp), "server_port": srv.port,
            "listener_port": listener.getsockname()[1], "server_pid": srv.proc.pid, "other_pid": other_os_pid}
    with listener:
        proc, done, log = run(srv, srv.key_a, "evil/evil.py", HOSTILE, args=[json.dumps(args)])
        with pytest.raises(socket.timeout):
            listener.accept()                                  # nothing reached the host's loopback
    assert done["exit_code"] == 0, log
    out = report(log)
    for name in secrets:
        assert out[f"read:{name}"][0] in ("PermissionError", "FileNotFoundError"), (name, out[f"read:{name}"])
    for name in ("agents", "other_tenant"):
        assert out[f"list:{name}"][0] != "ok" or out[f"listing:{name}"] == [], (name, out)
    assert out["write:host"][0] in ("OSError", "PermissionError") and out["write:host"][1] in (13, 30), out
    assert not host_file.exists()
    assert out["write:tmp"] == ["ok", None] and not host_tmp.exists()          # a private scratch
    assert out["write:program_dir"][1] in (13, 30)                              # its program is read-only
    assert out["tcp:server"][1] == 101 and out["tcp:listener"][1] == 101        # ENETUNREACH: no network
    assert out["signal:server"][0] == out["signal:other"][0] == "ProcessLookupError"
    assert out["environ:server"][0] == "FileNotFoundError"
    assert out["environ:init"][0] == out["mem:init"][0] == "PermissionError"
    assert len(out["pids"]) <= 3 and max(out["pids"]) < 16                      # its own PID namespace
    assert out["uid"] != 0
    for call in ("ptrace", "mount", "unshare"):
        assert out[call] == [-1, 1], (call, out[call])                          # EPERM
    assert out["own_file"] == "MINE"
    # The kernel saw each refused call, as a denied system call of that process.
    denied = srv.http().get("/v1/audit", params={"pid": proc["pid"], "denied": True}).json()["data"]
    assert {"os.ptrace", "os.mount", "os.unshare"} <= {r["call"] for r in denied}
    assert all(r["tenant"] == "team-a" and "seccomp" in r["reason"] for r in denied if r["call"].startswith("os."))
    # The other tenant's agent still runs, and runs under another uid.
    row = srv.http().get(f"/v1/processes/{other['pid']}").json()
    assert row["state"] == "running" and row["confinement"] == "jail/rlimits"
    srv.http().post(f"/v1/processes/{other['pid']}/kill")


def test_tenants_run_under_uids_of_their_own(srv):
    body = 'print("UID", os.getuid(), os.getgid(), os.getgroups(), flush=True)\n'
    uids = []
    for key in (srv.key_a, srv.key_b):
        _, done, log = run(srv, key, "uid.py", body)
        assert done["exit_code"] == 0, log
        uids.append(next(line.split()[1:] for line in log.splitlines() if line.startswith("UID")))
    assert uids[0] != uids[1] and all(u[0] == u[1] and int(u[0]) >= 1000 and u[2] == "[]" for u in uids), uids


def test_the_net_capability_gives_the_hosts_network(srv):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    body = f"""
        import socket
        s = socket.create_connection(("127.0.0.1", {port}), timeout=5)
        s.sendall(b"hello from a jail")
        s.close()
    """
    with listener:
        listener.settimeout(60)
        proc = None
        store(srv, srv.key_a, "net/dial.py", "import socket\n" + textwrap.dedent(body))
        r = srv.http(srv.key_a).post("/v1/processes", json={"path": "net/dial.py", "caps": ["net"]})
        assert r.status_code == 201, r.text
        proc = r.json()
        conn, _ = listener.accept()
        with conn:
            assert conn.recv(100) == b"hello from a jail"
    assert srv.wait(proc["pid"], key=srv.key_a)["exit_code"] == 0
    # A child gets at most its parent's: a parent without net cannot hand it out.
    _, done, log = run(srv, srv.key_a, "net/parent.py", """
        try:
            agent.spawn("dial.py", caps=["net"])
        except agent.PermissionDenied as e:
            print("REFUSED", e.capability, flush=True)
    """, caps=["proc:spawn", "llm"])
    assert done["exit_code"] == 0 and "REFUSED net" in log, log


@pytest.mark.parametrize("name, body, limits, reason", [
    ("forkbomb", """
        children = []
        while True:
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            children.append(pid)
     """, {"max_pids": 16}, "max_pids"),
    ("membomb", """
        hog = [bytearray(16 << 20) for _ in range(1000)]
     """, {"max_memory": 256 << 20}, "max_memory"),
    ("diskfill", """
        with open("/tmp/fill", "wb") as f:
            while True:
                f.write(b"x" * (1 << 20))
                f.flush()
     """, {}, "max_scratch"),
])
def test_bombs_are_contained_and_recorded_with_their_reason(srv, name, body, limits, reason):
    proc, done, log = run(srv, srv.key_bomb, f"bombs/{name}.py", body, limits=limits, restart="on-failure")
    assert done["state"] == "failed" and done["reason"] == reason, (done, log[-2000:])
    row = srv.http().get(f"/v1/processes/{proc['pid']}").json()
    assert row["restarts"] == 0                      # a limit is a decision: no restart undoes it


def test_a_tenant_key_may_run_only_programs_from_its_storage(srv, tmp_path):
    tmp_path.chmod(0o755)
    (tmp_path / "w.py").write_text("print('host program')\n")
    http = srv.http(srv.key_a)
    for body, word in (({"path": str(tmp_path / "w.py")}, "host path"), ({"path": "/etc/passwd"}, "host path"),
                       ({"path": "json.tool:main"}, "module:function"),
                       ({"path": "uid.py", "cwd": str(tmp_path)}, "working directory")):
        r = http.post("/v1/processes", json=body)
        assert r.status_code == 403, r.text
        err = r.json()["error"]
        assert err["code"] == "admin_required" and word in err["message"] and "admin key" in err["message"], err
    r = http.post("/v1/processes", json={"path": "../team-b/secret.txt"})
    assert r.status_code == 400 and "escapes" in r.json()["error"]["message"]
    r = http.post("/v1/processes", json={"path": "no/such.py"})
    assert r.status_code == 404
    # An admin may run the host program, and it is confined too.
    proc = srv.spawn(tmp_path / "w.py")
    assert srv.wait(proc["pid"])["exit_code"] == 0 and "host program" in srv.log_of(proc["pid"])
    assert srv.http().get(f"/v1/processes/{proc['pid']}").json()["confinement"] == "jail/rlimits"


def test_remote_run_uploads_the_directory_and_its_sibling_module_imports(srv, tmp_path):
    project = tmp_path / "project"
    (project / "__pycache__").mkdir(parents=True)
    (project / "helper.py").write_text("def shout(s):\n    return s.upper() + '!'\n")
    (project / "worker.py").write_text("import helper\nfrom llmos import agent\n"
                                       "print(helper.shout('imported'), agent.chat('Say hi.', max_tokens=4) != '')\n")
    env = {**os.environ, "LLMOS_API_KEY": srv.key_a}
    r = subprocess.run([sys.executable, "-m", "llmos.cli", "run", "./worker.py", "--dir", ".", "--cap", "llm",
                        "--wait", "--url", srv.url], capture_output=True, text=True, env=env, cwd=project, timeout=300)
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout.splitlines()[0])
    assert "IMPORTED! True" in srv.http(srv.key_a).get(f"/v1/processes/{pid}/logs").text
    assert srv.http(srv.key_a).get("/v1/fs/programs/project/helper.py").content.startswith(b"def shout")
    ps = subprocess.run([sys.executable, "-m", "llmos.cli", "ps", "--all", "--url", srv.url], capture_output=True,
                        text=True, env=env, timeout=60)
    assert "CONFINEMENT" in ps.stdout.splitlines()[0] and "jail/rlimits" in ps.stdout, ps.stdout


def test_a_confined_agents_own_system_calls_all_work(srv):
    _, done, log = run(srv, srv.key_a, "good/good.py", """
        text = agent.chat("Name a colour.", max_tokens=6, temperature=0)
        agent.fs.write("good/out.txt", text)
        assert agent.fs.read("good/out.txt") == text.encode()
        agent.send(agent.name, {"n": 1})
        m = agent.recv(timeout=10)
        agent.ack(m)
        result = agent.call_tool("calculator", expression="6 * 7")
        mid = agent.remember("the launch code is blue", metadata={"k": 1})
        recalled = agent.recall("what is the launch code?", k=1)
        print("GOOD", bool(text), m.body, result, recalled[0].text, flush=True)
    """)
    assert done["exit_code"] == 0, log
    assert "GOOD True {'n': 1} 42" in log and "the launch code is blue" in log, log


def test_kernel_stats_say_how_agents_are_confined(srv):
    stats = srv.http().get("/v1/kernel/stats").json()
    assert stats["agents"]["confinement"] == "jail" and stats["agents"]["limits"] in ("cgroup", "rlimits")


def test_the_jail_fails_closed_where_the_os_refuses_a_namespace(tmp_path):
    """A kernel whose own process may not create namespaces (here: a seccomp filter on it,
    as a container runtime's profile would be) refuses to spawn, naming what is missing."""
    script = textwrap.dedent(f"""
        import errno, sys, pyseccomp
        f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        f.add_rule(pyseccomp.ERRNO(errno.EPERM), "unshare")
        f.load()
        from pathlib import Path
        from llmos.kernel.agents import AgentKernel
        from llmos.server.settings import AgentSettings

        class NoLLM:
            def __getattr__(self, name):
                return lambda *a, **k: None
        k = AgentKernel(Path({str(tmp_path / 'agents')!r}), "http://127.0.0.1:9", NoLLM(), confinement=AgentSettings())
        Path({str(tmp_path / 'p.py')!r}).write_text("print('ran')")
        try:
            k.spawn(tenant="t", path={str(tmp_path / 'p.py')!r}, admin=True)
        except Exception as e:
            print(type(e).__name__, e)
        print("STATE", k.table.list(include_exited=True)[0].state.value)
        k.shutdown()
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "JailError" in r.stdout and "cannot create a" in r.stdout and "namespace" in r.stdout, r.stdout
    assert "STATE failed" in r.stdout and "ran" not in r.stdout
