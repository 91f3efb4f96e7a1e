"""The process table and the supervisor, on real OS processes (tiny Python scripts) and a
real SQLite file."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from llmos.errors import InvalidRequestError
from llmos.kernel.process import (Limits, LimitExceeded, NameTaken, NoSuchProcess, ProcessState,
                                  ProcessTable)
from llmos.kernel.supervisor import DeadlockError, Supervisor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def table(tmp_path):
    t = ProcessTable(tmp_path / "procs.db")
    yield t
    t.close()


@pytest.fixture
def make_sup(tmp_path, table):
    made = []

    def make(**kw):
        kw.setdefault("kill_grace", 1.0)
        s = Supervisor(table, tmp_path / "home", launcher=lambda p: [sys.executable, *p.argv],
                       env={"LLMOS_URL": "http://kernel.test"}, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.shutdown()


@pytest.fixture
def sup(make_sup):
    return make_sup()


@pytest.fixture
def script(tmp_path):
    """Writes a Python program into tmp_path and returns its path."""
    def write(name: str, body: str) -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(body))
        return str(path)
    return write


def eventually(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def os_alive(os_pid: int) -> bool:
    """True while that OS process exists and is not a zombie."""
    try:
        data = Path(f"/proc/{os_pid}/stat").read_bytes()
    except OSError:
        return False
    return data.rsplit(b")", 1)[1].split()[0] != b"Z"


SLEEPER = "import time\nprint('ready', flush=True)\ntime.sleep(60)\n"


def test_spawn_exit_code_wait_and_usage(sup, script, tmp_path, table):
    ok = sup.spawn(tenant="t", argv=[script("ok.py", "print('hi')")], cwd=str(tmp_path))
    bad = sup.spawn(tenant="t", argv=[script("bad.py", "import sys; sys.exit(3)")], cwd=str(tmp_path))
    assert ok.state is ProcessState.RUNNING and ok.os_pid and ok.os_start and ok.started
    assert ok.name == f"ok-{ok.pid}" and bad.pid > ok.pid
    assert sup.wait(ok.pid, timeout=10) == 0 and sup.wait(bad.pid, timeout=10) == 3
    ok, bad = table.get(ok.pid), table.get(bad.pid)
    assert (ok.state, ok.reason, ok.exit_code) == (ProcessState.EXITED, "exit", 0)
    assert (bad.state, bad.reason, bad.exit_code) == (ProcessState.FAILED, "exit 3", 3)
    assert ok.ended >= ok.started and ok.cpu_seconds > 0 and ok.peak_rss > 1 << 20
    assert sup.read_log(ok.pid) == b"hi\n"
    assert sup.wait(ok.pid) == 0                         # an ended process answers at once
    json.dumps(ok.to_dict())
    with pytest.raises(NoSuchProcess):
        sup.wait(999)


def test_token_identifies_the_live_process_only(sup, script, tmp_path, table):
    prog = script("tok.py", """
        import os, sys, time
        open(sys.argv[1], "w").write(os.environ["LLMOS_TOKEN"])
        time.sleep(60)
    """)
    p = sup.spawn(tenant="t", argv=[prog, str(tmp_path / "token")], cwd=str(tmp_path))
    token = eventually(lambda: (tmp_path / "token").exists() and (tmp_path / "token").read_text())
    assert table.by_token(token).pid == p.pid
    assert table.by_token("not-a-token") is None
    with sqlite3.connect(table.path) as db:                  # only a hash is stored
        assert token not in {r[0] for r in db.execute("SELECT token_hash FROM processes")}
    sup.kill(p.pid)
    sup.wait(p.pid, timeout=10)
    assert table.by_token(token) is None


def test_environment_is_clean(sup, script, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_TEST_SECRET", "do-not-leak")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-leak")
    prog = script("env.py", "import json, os; print(json.dumps(dict(os.environ)))")
    p = sup.spawn(tenant="acme", argv=[prog], cwd=str(tmp_path), name="envy")
    assert sup.wait(p.pid, timeout=10) == 0
    env = json.loads(sup.read_log(p.pid))
    # LC_CTYPE only appears if Python itself coerces a C locale (PEP 538).
    assert set(env) - {"LC_CTYPE"} <= {"PATH", "HOME", "LANG", "TMPDIR", "LLMOS_URL", "LLMOS_PID",
                                       "LLMOS_NAME", "LLMOS_TOKEN", "LLMOS_TENANT", "LLMOS_RESTARTS"}
    assert env["LLMOS_PID"] == str(p.pid) and env["LLMOS_NAME"] == "envy" and env["LLMOS_TENANT"] == "acme"
    assert env["LLMOS_URL"] == "http://kernel.test" and env["PATH"] == os.environ["PATH"]


def test_own_session_and_process_group_with_null_stdin(sup, script, tmp_path):
    prog = script("grp.py", """
        import os, sys
        print(os.getpgid(0) == os.getpid(), os.getsid(0) == os.getpid(), repr(sys.stdin.read()))
    """)
    p = sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path))
    assert sup.wait(p.pid, timeout=10) == 0
    assert sup.read_log(p.pid) == b"True True ''\n"


def test_what_an_agent_leaves_running_dies_with_it(sup, script, tmp_path):
    prog = script("leave.py", """
        import subprocess, sys
        print(subprocess.Popen(["sleep", "60"]).pid, flush=True)
    """)
    p = sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path))
    assert sup.wait(p.pid, timeout=10) == 0
    straggler = int(sup.read_log(p.pid))
    eventually(lambda: not os_alive(straggler))


def test_log_is_capped_and_keeps_the_newest(make_sup, script, tmp_path):
    sup = make_sup(log_cap=64 << 10)
    prog = script("chatty.py", """
        for i in range(40000):
            print(f"line {i:08d} " + "x" * 60)
        print("END")
    """)
    p = sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path))
    assert sup.wait(p.pid, timeout=20) == 0
    path = sup.log_path(p.pid)
    assert path.with_name(path.name + ".1").exists()
    log = sup.read_log(p.pid)
    assert len(log) <= 64 << 10 and log.endswith(b"END\n")
    assert sup.read_log(p.pid, tail_bytes=4) == b"END\n"
    assert b"line 00000000" not in log and b"line 00039999" in log


def test_kill_escalates_to_sigkill_after_grace(make_sup, script, tmp_path, table):
    sup = make_sup(kill_grace=0.5)
    prog = script("stubborn.py", "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + SLEEPER)
    p = sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path))
    eventually(lambda: b"ready" in sup.read_log(p.pid))
    t0 = time.monotonic()
    assert sup.kill(p.pid)
    assert sup.wait(p.pid, timeout=10) == -signal.SIGKILL
    assert time.monotonic() - t0 >= 0.45
    row = table.get(p.pid)
    assert (row.state, row.reason) == (ProcessState.KILLED, "killed")
    assert not os_alive(p.os_pid)
    assert not sup.kill(p.pid)                            # already ended


def test_kill_takes_descendants(sup, script, tmp_path, table):
    prog = script("sleep.py", SLEEPER)
    root = sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path))
    child = sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path), ppid=root.pid)
    grandchild = sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path), ppid=child.pid)
    other = sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path))
    assert [c.pid for c in table.children(root.pid)] == [child.pid]
    assert [d.pid for d in table.descendants(root.pid)] == [child.pid, grandchild.pid]
    assert sup.kill(root.pid)
    for p in (root, child, grandchild):
        assert sup.wait(p.pid, timeout=10) == -signal.SIGTERM
        assert table.get(p.pid).state is ProcessState.KILLED and not os_alive(p.os_pid)
    assert table.get(other.pid).state is ProcessState.RUNNING


def test_suspend_and_resume(make_sup, script, tmp_path, table):
    events = []
    sup = make_sup(on_suspend=lambda pid: events.append(("suspend", pid)),
                   on_resume=lambda pid: events.append(("resume", pid)))
    counter = tmp_path / "count"
    prog = script("count.py", """
        import sys, time
        i = 0
        while True:
            i += 1
            open(sys.argv[1], "w").write(str(i))
            time.sleep(0.01)
    """)
    p = sup.spawn(tenant="t", argv=[prog, str(counter)], cwd=str(tmp_path))
    count = lambda: int(counter.read_text() or 0) if counter.exists() else 0  # noqa: E731
    eventually(lambda: count() > 3)
    assert sup.set_state(p.pid, "blocked") and table.get(p.pid).state is ProcessState.BLOCKED
    assert sup.suspend(p.pid) and table.get(p.pid).state is ProcessState.SUSPENDED
    assert not sup.suspend(p.pid)
    time.sleep(0.1)
    frozen = count()
    time.sleep(0.3)
    assert count() == frozen
    assert sup.set_state(p.pid, "running")                # remembered, stays suspended
    assert table.get(p.pid).state is ProcessState.SUSPENDED
    assert sup.resume(p.pid) and table.get(p.pid).state is ProcessState.RUNNING
    assert not sup.resume(p.pid)
    eventually(lambda: count() > frozen + 3)
    assert events == [("suspend", p.pid), ("resume", p.pid)]
    sup.suspend(p.pid)                                    # a suspended process can still be killed
    sup.kill(p.pid)
    assert sup.wait(p.pid, timeout=10) == -signal.SIGTERM
    assert not sup.set_state(p.pid, "running") and table.get(p.pid).state is ProcessState.KILLED


def test_max_wall(sup, script, tmp_path, table):
    p = sup.spawn(tenant="t", argv=[script("sleep.py", SLEEPER)], cwd=str(tmp_path), limits=Limits(max_wall=0.3))
    assert sup.wait(p.pid, timeout=10) == -signal.SIGTERM
    row = table.get(p.pid)
    assert (row.state, row.reason) == (ProcessState.KILLED, "max_wall")
    assert 0.25 <= row.ended - row.started < 5


def test_max_cpu(sup, script, tmp_path, table):
    p = sup.spawn(tenant="t", argv=[script("spin.py", "while True: pass")], cwd=str(tmp_path),
                  limits=Limits(max_cpu=1))
    assert sup.wait(p.pid, timeout=15) in (-signal.SIGXCPU, -signal.SIGKILL)
    row = table.get(p.pid)
    assert (row.state, row.reason) == (ProcessState.KILLED, "max_cpu")
    assert row.cpu_seconds >= 0.9


def test_max_memory(sup, script, tmp_path, table):
    prog = script("hog.py", "import time\ntime.sleep(0.1)\nx = bytearray(1 << 30)\n")
    p = sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path), limits=Limits(max_memory=256 << 20))
    assert sup.wait(p.pid, timeout=10) == 1
    row = table.get(p.pid)
    assert (row.state, row.reason) == (ProcessState.FAILED, "max_memory")


def test_max_children(sup, script, tmp_path):
    prog = script("sleep.py", SLEEPER)
    parent = sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path), limits=Limits(max_children=1))
    first = sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path), ppid=parent.pid)
    assert first.limits.max_children == 1                 # inherited
    with pytest.raises(LimitExceeded, match="max_children") as e:
        sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path), ppid=parent.pid)
    assert e.value.limit == "max_children"
    sup.kill(first.pid)
    sup.wait(first.pid, timeout=10)
    sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path), ppid=parent.pid)


def test_limits_only_narrow(sup, script, tmp_path):
    parent = Limits(max_tokens=1000, max_wall=60.0, max_memory=1 << 30)
    assert Limits.narrow(parent, Limits(max_tokens=10, max_wall=1.5, max_memory=1 << 20, max_cpu=5)).max_tokens == 10
    with pytest.raises(LimitExceeded, match="max_tokens") as e:
        Limits.narrow(parent, Limits(max_tokens=1001, max_wall=60, max_memory=1 << 30))
    assert e.value.limit == "max_tokens"
    with pytest.raises(LimitExceeded, match="max_wall"):   # unbounded where the parent is bounded
        Limits.narrow(parent, Limits(max_tokens=10, max_memory=1 << 30))
    child = Limits.from_dict({"max_tokens": 5}, base=parent)
    assert (child.max_tokens, child.max_wall, child.max_memory) == (5, 60.0, 1 << 30)
    with pytest.raises(InvalidRequestError, match="max_tokens: must be a positive integer, got 'x'"):
        Limits(max_tokens="x")
    with pytest.raises(InvalidRequestError, match="max_wall"):
        Limits(max_wall=-1)
    with pytest.raises(InvalidRequestError, match="max_cpu"):
        Limits(max_cpu=True)
    with pytest.raises(InvalidRequestError, match="unknown field 'max_gpus'"):
        Limits.from_dict({"max_gpus": 1})

    prog = script("sleep.py", SLEEPER)
    p = sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path), limits=Limits(max_tokens=100, max_wall=30))
    assert sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path), ppid=p.pid).limits == p.limits
    with pytest.raises(LimitExceeded, match="max_tokens"):
        sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path), ppid=p.pid, limits=Limits(max_tokens=200, max_wall=30))
    with pytest.raises(InvalidRequestError, match="another tenant"):
        sup.spawn(tenant="u", argv=[prog], cwd=str(tmp_path), ppid=p.pid)


def test_restart_on_failure_backs_off_then_gives_up(make_sup, script, tmp_path, table):
    sup = make_sup(restart_backoff=(0.05, 0.15), max_restarts=3)
    runs = tmp_path / "runs"
    prog = script("crash.py", """
        import os, sys, time
        with open(sys.argv[1], "a") as f:
            f.write(f"{time.time()} {os.environ['LLMOS_PID']} {os.getpid()}\\n")
        sys.exit(1)
    """)
    p = sup.spawn(tenant="t", argv=[prog, str(runs)], cwd=str(tmp_path), name="crashy", restart="on-failure")
    assert sup.wait(p.pid, timeout=20) == 1
    row = table.get(p.pid)
    assert (row.state, row.reason, row.restarts, row.name) == (ProcessState.FAILED, "restart limit", 3, "crashy")
    lines = [line.split() for line in runs.read_text().splitlines()]
    assert len(lines) == 4 and {pid for _, pid, _ in lines} == {str(p.pid)}
    assert len({os_pid for _, _, os_pid in lines}) == 4
    times = [float(t) for t, _, _ in lines]
    gaps = [b - a for a, b in zip(times, times[1:])]
    for gap, backoff in zip(gaps, (0.05, 0.1, 0.15)):        # 0.05 * 2**n, capped at 0.15
        assert gap >= backoff - 0.01

    done = sup.spawn(tenant="t", argv=[script("fine.py", "pass")], cwd=str(tmp_path), restart="on-failure")
    assert sup.wait(done.pid, timeout=10) == 0 and table.get(done.pid).restarts == 0


def test_kill_cancels_a_pending_restart(make_sup, script, tmp_path, table):
    exits = []
    sup = make_sup(restart_backoff=(5.0, 5.0), on_exit=lambda p: exits.append((p.state, p.reason)))
    p = sup.spawn(tenant="t", argv=[script("crash.py", "import sys; sys.exit(2)")], cwd=str(tmp_path),
                  restart="on-failure")
    eventually(lambda: table.get(p.pid).exit_code == 2)
    row = table.get(p.pid)
    assert (row.state, row.reason) == (ProcessState.STARTING, "exit 2")     # waiting out its backoff
    assert sup.wait(p.pid, timeout=0.1) is None
    assert sup.kill(p.pid)
    assert sup.wait(p.pid, timeout=1) == 2
    assert table.get(p.pid).state is ProcessState.KILLED and table.get(p.pid).restarts == 0
    assert exits == [(ProcessState.STARTING, "exit 2"), (ProcessState.KILLED, "killed")]


def test_restart_always_keeps_pid_and_name(make_sup, script, tmp_path, table):
    sup = make_sup(restart_backoff=(0.05, 0.05))
    marker = tmp_path / "ran-once"
    prog = script("phoenix.py", """
        import os, sys, time
        if not os.path.exists(sys.argv[1]):
            open(sys.argv[1], "w").write(os.environ["LLMOS_TOKEN"])
            sys.exit(0)
        print("second life", flush=True)
        time.sleep(60)
    """)
    p = sup.spawn(tenant="t", argv=[prog, str(marker)], cwd=str(tmp_path), name="phoenix", restart="always")
    assert sup.wait(p.pid, timeout=0.5) is None            # a restart is no end
    eventually(lambda: b"second life" in sup.read_log(p.pid))
    row = table.get(p.pid)
    assert (row.pid, row.name, row.restarts, row.state) == (p.pid, "phoenix", 1, ProcessState.RUNNING)
    assert row.os_pid != p.os_pid and os_alive(row.os_pid)
    assert table.by_token(marker.read_text()) is None       # the first run's token died with it
    assert table.by_name("t", "phoenix").pid == p.pid
    sup.kill(p.pid)                                        # an explicit kill is never restarted
    assert sup.wait(p.pid, timeout=10) == -signal.SIGTERM
    time.sleep(0.2)
    assert table.get(p.pid).state is ProcessState.KILLED and table.get(p.pid).restarts == 1


def test_names_are_unique_among_live_processes(sup, script, tmp_path, table):
    prog = script("sleep.py", SLEEPER)
    a = sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path), name="worker")
    with pytest.raises(NameTaken):
        sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path), name="worker")
    other = sup.spawn(tenant="u", argv=[prog], cwd=str(tmp_path), name="worker")
    assert table.by_name("t", "worker").pid == a.pid and table.by_name("u", "worker").pid == other.pid
    for bad in ("", "42", "a b", "x" * 65, 7):
        with pytest.raises(InvalidRequestError, match="name"):
            sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path), name=bad)
    sup.kill(a.pid)
    sup.wait(a.pid, timeout=10)
    b = sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path), name="worker")
    assert table.by_name("t", "worker").pid == b.pid
    sup.kill(b.pid)
    sup.wait(b.pid, timeout=10)
    assert table.by_name("t", "worker").pid == b.pid          # no live one: the most recent
    assert [p.pid for p in table.list(tenant="u")] == [other.pid]
    assert {p.pid for p in table.list(tenant="t", include_exited=True)} == {a.pid, b.pid}


def test_bad_requests_are_refused(sup, script, tmp_path):
    prog = script("sleep.py", SLEEPER)
    cases = [({"argv": []}, "argv"), ({"argv": "x.py"}, "argv"), ({"cwd": str(tmp_path / "nope")}, "cwd"),
             ({"tenant": ""}, "tenant"), ({"restart": "sometimes"}, "restart"), ({"weight": 0}, "weight"),
             ({"priority": "high"}, "priority"), ({"caps": "llm"}, "caps"), ({"ppid": 12345}, "no process")]
    for change, match in cases:
        kw = {"tenant": "t", "argv": [prog], "cwd": str(tmp_path), **change}
        with pytest.raises((InvalidRequestError, NoSuchProcess), match=match):
            sup.spawn(**kw)


def test_pid_is_never_reused(tmp_path):
    path = tmp_path / "procs.db"
    t = ProcessTable(path)
    pids = [t.create(tenant="t", argv=["a.py"], cwd="/").pid for _ in range(3)]
    t.close()
    with sqlite3.connect(path) as db:                      # prune the newest row
        db.execute("DELETE FROM processes WHERE pid = ?", (pids[-1],))
    t = ProcessTable(path)
    assert t.create(tenant="t", argv=["a.py"], cwd="/").pid == pids[-1] + 1
    t.close()


def test_usage_counters_add_up_across_threads(table):
    p = table.create(tenant="t", argv=["agent:main"], cwd="/", caps=["llm", "msg"])
    assert p.name == f"main-{p.pid}" and p.caps == ["llm", "msg"]

    def work():
        for _ in range(100):
            table.add_usage(p.pid, prompt_tokens=3, output_tokens=1, syscalls=1, messages=1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    table.add_usage(p.pid, peak_rss=100)
    table.add_usage(p.pid, peak_rss=50, cpu_seconds=0.5)
    row = table.get(p.pid)
    assert (row.prompt_tokens, row.output_tokens, row.syscalls, row.messages) == (1200, 400, 400, 400)
    assert (row.peak_rss, row.cpu_seconds) == (100, 0.5)
    with pytest.raises(InvalidRequestError, match="bogus"):
        table.add_usage(p.pid, bogus=1)
    with pytest.raises(InvalidRequestError, match="tenant"):
        table.update(p.pid, tenant="other")
    with pytest.raises(NoSuchProcess):
        table.update(999, priority=1)


def test_renice(sup, script, tmp_path, table):
    p = sup.spawn(tenant="t", argv=[script("sleep.py", SLEEPER)], cwd=str(tmp_path))
    assert sup.renice(p.pid, -5, weight=2.5)
    assert (table.get(p.pid).priority, table.get(p.pid).weight) == (-5, 2.5)
    with pytest.raises(InvalidRequestError, match="weight"):
        sup.renice(p.pid, 0, weight=-1)
    sup.kill(p.pid)
    sup.wait(p.pid, timeout=10)
    assert not sup.renice(p.pid, 3)


def test_wait_detects_deadlock(sup, script, tmp_path):
    prog = script("sleep.py", SLEEPER)
    a, b, c = (sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path)).pid for _ in range(3))
    with pytest.raises(DeadlockError, match=f"{a} -> {a}"):
        sup.wait(a, waiter=a)
    results = {}
    waits = [threading.Thread(target=lambda w=w, t=t: results.__setitem__(w, sup.wait(t, timeout=10, waiter=w)))
             for w, t in ((a, b), (b, c))]
    for th in waits:
        th.start()
    time.sleep(0.2)                                        # both waits registered
    with pytest.raises(DeadlockError, match=f"{c} -> {a} -> {b} -> {c}"):
        sup.wait(a, waiter=c)
    assert sup.wait(c, timeout=0.05, waiter=a) is None      # a second wait on the same edge is fine
    sup.kill(c)
    sup.kill(b, reason="done")
    for th in waits:
        th.join(10)
    assert results == {a: -signal.SIGTERM, b: -signal.SIGTERM}
    assert sup.wait(a, timeout=0.05, waiter=c) is None      # the edges are gone: no deadlock now


def test_shutdown_kills_everything(make_sup, script, tmp_path, table):
    sup = make_sup()
    prog = script("sleep.py", SLEEPER)
    procs = [sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path)) for _ in range(3)]
    sup.shutdown()
    for p in procs:
        row = table.get(p.pid)
        assert (row.state, row.reason) == (ProcessState.KILLED, "shutdown") and not os_alive(p.os_pid)
    with pytest.raises(Exception, match="shut down"):
        sup.spawn(tenant="t", argv=[prog], cwd=str(tmp_path))


DEAD_KERNEL = """
import sys, time
from pathlib import Path
from llmos.kernel.process import ProcessTable
from llmos.kernel.supervisor import Supervisor

table = ProcessTable(sys.argv[1])
sup = Supervisor(table, Path(sys.argv[2]), launcher=lambda p: [sys.executable, *p.argv], env={})
p = sup.spawn(tenant="t", argv=[sys.argv[3]], cwd=sys.argv[4], name="keeper", restart="always")
print(p.pid, p.os_pid, flush=True)
time.sleep(60)
"""


def test_recover_kills_orphans_and_restarts_them(tmp_path, script):
    """A kernel dies (SIGKILL, no shutdown); its agent runs on, orphaned. The next kernel
    must kill that agent before restarting it, so it never runs twice."""
    db, home, prog = tmp_path / "procs.db", tmp_path / "home", script("sleep.py", SLEEPER)
    kernel = subprocess.Popen([sys.executable, script("kernel.py", DEAD_KERNEL), str(db), str(home), prog,
                               str(tmp_path)], stdout=subprocess.PIPE, cwd=ROOT)
    pid, old_os_pid = map(int, kernel.stdout.readline().split())
    kernel.kill()
    kernel.wait()
    assert os_alive(old_os_pid)                            # the orphan outlived its kernel

    table = ProcessTable(db)
    sup = Supervisor(table, home, launcher=lambda p: [sys.executable, *p.argv], env={}, kill_grace=1.0)
    try:
        assert sup.recover() == [pid]
        assert not os_alive(old_os_pid)
        row = table.get(pid)
        assert (row.pid, row.name, row.restarts, row.state) == (pid, "keeper", 1, ProcessState.RUNNING)
        assert row.os_pid != old_os_pid and os_alive(row.os_pid)
    finally:
        sup.shutdown()
        table.close()


def test_recover_spares_a_stranger_with_a_reused_pid(make_sup, table, tmp_path):
    exits = []
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        start = int(Path(f"/proc/{stranger.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19])
        row = table.create(tenant="t", argv=["gone.py"], cwd=str(tmp_path), restart="never")
        table.update(row.pid, state="running", os_pid=stranger.pid, os_start=start + 1)
        dead = table.create(tenant="t", argv=["gone.py"], cwd=str(tmp_path))
        table.update(dead.pid, state="blocked", os_pid=stranger.pid + 100000, os_start=1)
        sup = make_sup(on_exit=lambda p: exits.append(p.pid))
        assert sup.recover() == []
        time.sleep(0.1)
        assert stranger.poll() is None                     # not ours: left alone
        for pid in (row.pid, dead.pid):
            got = table.get(pid)
            assert (got.state, got.reason, got.exit_code) == (ProcessState.FAILED, "lost", None)
        assert exits == [row.pid, dead.pid]
    finally:
        stranger.kill()
        stranger.wait()
