"""Agents as processes, end to end on the real model: a real `llmos serve`, agents started
as OS processes through the HTTP API and the CLI, talking to the kernel only through
system calls (the llmos.agent SDK)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from test_server import ROOT, ServerProcess, wait_for

EXAMPLES = ROOT / "examples"


class AgentServer(ServerProcess):
    def __init__(self, tmp: Path, extra: dict | None = None, **server) -> None:
        self.agents_dir = tmp / "agents"
        server = {"agents_dir": str(self.agents_dir), "kill_grace": 2.0, "restart_backoff_max": 0.3,
                  "max_restarts": 30, "denial_threshold": 8, **server}
        super().__init__(tmp, server=server, engine={"scheduling_policy": "fair"}, extra=extra)

    def spawn(self, path: Path | str, key: str | None = None, **body) -> dict:
        r = self.http(key).post("/v1/processes", json={"path": str(path), **body})
        assert r.status_code == 201, r.text
        return r.json()

    def wait(self, pid: int, timeout: float = 120, key: str | None = None) -> dict:
        deadline = time.monotonic() + timeout
        with self.http(key) as http:
            while True:
                r = http.get(f"/v1/processes/{pid}/wait", params={"timeout": 5}).json()
                if r["done"] or time.monotonic() > deadline:
                    return r
    
    def log_of(self, pid: int) -> str:
        return self.http().get(f"/v1/processes/{pid}/logs").text

    def file(self, tenant: str, path: str) -> Path:
        return self.agents_dir / "files" / tenant / path

    def cli(self, *args: str, key: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "LLMOS_API_KEY": key or self.admin_key}
        r = subprocess.run([sys.executable, "-m", "llmos.cli", args[0], "--url", self.url, *args[1:]], capture_output=True,
                           text=True, env=env, timeout=300, cwd=self.tmp)
        if check:
            assert r.returncode == 0, r.stderr
        return r


@pytest.fixture(scope="module")
def srv(tmp_path_factory, default_model_path):
    s = AgentServer(tmp_path_factory.mktemp("agents"))
    yield s
    assert s.stop() == 0, s.log.read_text()


def program(tmp: Path, name: str, body: str) -> Path:
    tmp.chmod(0o755)           # a jailed agent runs as its tenant's uid: its directory must be readable
    path = tmp / name
    path.write_text("import json, os, sys, time\nfrom llmos import agent\n" + textwrap.dedent(body))
    return path


def test_agent_chats_writes_and_exits(srv, tmp_path):
    p = program(tmp_path, "hello.py", """
        text = agent.chat("Say hello in three words.", max_tokens=12, temperature=0)
        agent.fs.write("hello/out.txt", text)
        print("pid", agent.pid, "name", agent.name, "said", text)
        assert agent.fs.read("hello/out.txt") == text.encode()
        assert agent.self()["state"] in ("running", "blocked")
        sys.exit(3)
    """)
    proc = srv.spawn(p, name="hello", caps=["llm", "fs:read:hello/*", "fs:write:hello/*"])
    assert proc["state"] in ("starting", "running") and proc["name"] == "hello"
    done = srv.wait(proc["pid"])
    assert done["exit_code"] == 3 and done["state"] == "failed", srv.log_of(proc["pid"])
    text = srv.file("default", "hello/out.txt").read_text()
    assert text and f"pid {proc['pid']} name hello said" in srv.log_of(proc["pid"])
    row = srv.http().get(f"/v1/processes/{proc['pid']}").json()
    assert row["output_tokens"] > 0 and row["prompt_tokens"] > 0 and row["syscalls"] >= 4
    calls = [r["call"] for r in srv.http().get("/v1/audit", params={"pid": proc["pid"]}).json()["data"]]
    assert calls[:2] == ["llm.chat", "fs.write"] and all(r for r in calls)


def test_denied_calls_of_every_family_are_refused_and_audited(srv, tmp_path):
    p = program(tmp_path, "denied.py", """
        results = {}
        for name, call in [("llm", lambda: agent.chat("hi", max_tokens=2)),
                           ("fs", lambda: agent.fs.write("secret.txt", "x")),
                           ("proc", lambda: agent.spawn(__file__)),
                           ("msg", lambda: agent.publish("news", {"a": 1})),
                           ("escape", lambda: agent.fs.read("../other/x")),
                           ("absolute", lambda: agent.fs.read("/etc/passwd"))]:
            try:
                call()
                results[name] = "allowed"
            except agent.PermissionDenied as e:
                results[name] = "denied " + e.capability
            except Exception as e:
                results[name] = type(e).__name__ + " " + str(e)
        print(json.dumps(results))
    """)
    proc = srv.spawn(p, caps=["fs:read:*"])
    assert srv.wait(proc["pid"])["exit_code"] == 0, srv.log_of(proc["pid"])
    results = json.loads(srv.log_of(proc["pid"]).strip().splitlines()[-1])
    assert results["llm"] == "denied llm" and results["fs"] == "denied fs:write:secret.txt"
    assert results["proc"] == "denied proc:spawn" and results["msg"] == "denied msg:topic:news"
    assert "escapes" in results["escape"] and "escapes" in results["absolute"], results
    denied = srv.http().get("/v1/audit", params={"pid": proc["pid"], "denied": True}).json()["data"]
    assert {r["call"] for r in denied} == {"llm.chat", "fs.write", "proc.spawn", "msg.publish"}
    assert all(not r["allowed"] and r["reason"] for r in denied)
    out = json.loads(srv.cli("audit", "--pid", str(proc["pid"]), "--denied", "--json").stdout)
    assert {r["call"] for r in out} == {"llm.chat", "fs.write", "proc.spawn", "msg.publish"}


def test_child_gets_at_most_its_parents_capabilities_and_limits(srv, tmp_path):
    program(tmp_path, "child.py", "print('child ran')\n")
    p = program(tmp_path, "parent.py", """
        out = {}
        for name, kw in [("wider caps", dict(caps=["llm", "fs:write:*"])),
                         ("more tokens", dict(caps=["llm"], max_tokens=10_000)),
                         ("unbounded tokens", dict(caps=["llm"], max_tokens=None))]:
            try:
                agent.spawn("child.py", **kw)
                out[name] = "allowed"
            except agent.PermissionDenied as e:
                out[name] = "denied " + e.capability
            except Exception as e:
                out[name] = type(e).__name__
        pid = agent.spawn("child.py", caps=["llm"], max_tokens=50)
        out["narrower"] = agent.wait(pid)
        print(json.dumps(out))
    """)
    proc = srv.spawn(p, caps=["llm", "proc:spawn", "fs:read:*"], limits={"max_tokens": 100})
    assert srv.wait(proc["pid"])["exit_code"] == 0, srv.log_of(proc["pid"])
    out = json.loads(srv.log_of(proc["pid"]).strip().splitlines()[-1])
    assert out["wider caps"] == "denied fs:write:*", out
    assert out["more tokens"] != "allowed" and out["unbounded tokens"] != "allowed", out
    assert out["narrower"] == 0


def test_kill_takes_the_children_and_cancels_llm_requests(srv, tmp_path):
    program(tmp_path, "sleeper.py", "time.sleep(300)\n")
    p = program(tmp_path, "tree.py", """
        for i in range(2):
            agent.spawn("sleeper.py", name=f"{agent.name}-kid-{i}")
        agent.chat("Tell me a very long story about dragons.", max_tokens=500, ignore_eos=True)
    """)
    proc = srv.spawn(p, name="tree")
    http = srv.http()
    def running_kids():   # both spawned and both running (a child is "starting" for a moment)
        kids = [c for c in http.get("/v1/processes").json()["data"] if c["ppid"] == proc["pid"]]
        return kids if len(kids) == 2 and all(c["state"] == "running" for c in kids) else None
    kids = wait_for(running_kids)
    assert kids and len(kids) == 2, http.get("/v1/processes").json()
    assert wait_for(lambda: any(r["owner_pid"] == proc["pid"] for r in http.get("/v1/kernel/requests").json()["data"]))
    assert http.post(f"/v1/processes/{proc['pid']}/kill").json()["ok"]
    assert srv.wait(proc["pid"])["state"] == "killed"
    for k in kids:
        row = srv.wait(k["pid"])
        assert row["state"] == "killed", row
    assert wait_for(lambda: not any(r["owner_pid"] == proc["pid"]
                                    for r in http.get("/v1/kernel/requests").json()["data"]))


def test_suspend_takes_its_kv_out_of_the_pool_and_resume_continues_exactly(srv, tmp_path):
    prompt = "Write a long poem about the sea."
    p = program(tmp_path, "poet.py", f"""
        print(repr(agent.chat({prompt!r}, max_tokens=80, temperature=0, ignore_eos=True)))
    """)
    reference = srv.http().post("/v1/chat/completions", json={
        "model": "smollm2-135m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 80,
        "temperature": 0, "ignore_eos": True}).json()["choices"][0]["message"]["content"]
    proc = srv.spawn(p, name="poet")
    http = srv.http()
    row = wait_for(lambda: next((r for r in http.get("/v1/kernel/requests").json()["data"]
                                 if r["owner_pid"] == proc["pid"] and r["output_tokens"] > 5), None))
    assert row
    assert http.post(f"/v1/processes/{proc['pid']}/suspend").json()["state"] == "suspended"
    held = wait_for(lambda: next(r for r in http.get("/v1/kernel/requests").json()["data"]
                                 if r["request_id"] == row["request_id"])["state"] == "suspended")
    assert held
    req = next(r for r in http.get("/v1/kernel/requests").json()["data"] if r["request_id"] == row["request_id"])
    assert req["kv_blocks"] == 0
    before = req["output_tokens"]
    time.sleep(0.5)
    assert next(r for r in http.get("/v1/kernel/requests").json()["data"]
                if r["request_id"] == row["request_id"])["output_tokens"] == before
    assert http.post(f"/v1/processes/{proc['pid']}/resume").json()["ok"]
    assert srv.wait(proc["pid"])["exit_code"] == 0, srv.log_of(proc["pid"])
    assert srv.log_of(proc["pid"]).strip().splitlines()[-1] == repr(reference)


def test_token_limit_and_wall_limit(srv, tmp_path):
    p = program(tmp_path, "greedy.py", """
        try:
            for _ in range(10):
                agent.chat("Count to one hundred.", max_tokens=40, ignore_eos=True)
            print("no limit")
        except agent.AgentError as e:
            print("refused:", e)
    """)
    proc = srv.spawn(p, limits={"max_tokens": 120})
    assert srv.wait(proc["pid"])["exit_code"] == 0
    assert "refused: " in srv.log_of(proc["pid"]) and "max_tokens" in srv.log_of(proc["pid"])
    row = srv.http().get(f"/v1/processes/{proc['pid']}").json()
    assert row["prompt_tokens"] + row["output_tokens"] <= 120 + 40
    slow = program(tmp_path, "slow.py", "time.sleep(60)\n")
    proc = srv.spawn(slow, limits={"max_wall": 1})
    done = srv.wait(proc["pid"])
    assert done["state"] == "killed" and done["reason"] == "max_wall"


def test_unacked_message_is_redelivered_after_the_receiver_is_killed(srv, tmp_path):
    p = program(tmp_path, "flaky.py", """
        m = agent.recv(timeout=60)
        if m.deliveries == 1:
            os.kill(os.getpid(), 9)          # die holding it, unacknowledged
        agent.ack(m)
        agent.fs.write("flaky/got.json", json.dumps({"body": m.body, "deliveries": m.deliveries}))
    """)
    proc = srv.spawn(p, name="flaky", restart="on-failure")
    r = srv.http().post("/v1/messages", json={"to": "flaky", "body": {"n": 7}})
    assert r.status_code == 200, r.text
    assert srv.wait(proc["pid"])["exit_code"] == 0, srv.log_of(proc["pid"])
    got = json.loads(srv.file("default", "flaky/got.json").read_text())
    assert got == {"body": {"n": 7}, "deliveries": 2}
    assert srv.http().get(f"/v1/processes/{proc['pid']}").json()["restarts"] == 1


def test_messages_errors_are_clear(srv, tmp_path):
    http = srv.http()
    r = http.post("/v1/messages", json={"to": "nobody-by-that-name", "body": 1})
    assert r.status_code == 404 and "nobody-by-that-name" in r.json()["error"]["message"]
    program(tmp_path, "idle.py", "time.sleep(30)\n")
    proc = srv.spawn(tmp_path / "idle.py", name="idle")
    r = http.post("/v1/messages", json={"to": "idle", "body": "x" * 70000})
    assert r.status_code == 413 and r.json()["error"]["message"].startswith("body:")
    r = http.post("/v1/sys", json={"call": "proc.self"}, headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401
    http.post(f"/v1/processes/{proc['pid']}/kill")


def test_durable_agent_killed_at_every_step_neither_loses_nor_repeats_work(srv, tmp_path):
    p = program(tmp_path, "steps.py", """
        out, crash = sys.argv[1], sys.argv[2] == "crash"
        for i in range(20):
            text = agent.chat(f"Give one word for the number {i}.", max_tokens=6, temperature=0)
            agent.fs.append(out, f"{i} {text.strip()}\\n")
            # Run n dies right after step n's side effects (the journal replays steps 0..n-1;
            # the run number is the kernel's, not the journal's).
            if crash and int(os.environ["LLMOS_RESTARTS"]) == i:
                os.kill(os.getpid(), 9)
    """)
    plain = srv.spawn(p, args=["durable/plain.txt", "-"])
    durable = srv.spawn(p, args=["durable/crashed.txt", "crash"], durable=True, restart="on-failure")
    assert srv.wait(plain["pid"], 300)["exit_code"] == 0, srv.log_of(plain["pid"])
    done = srv.wait(durable["pid"], 300)
    assert done["exit_code"] == 0, (done, srv.log_of(durable["pid"]))
    crashed = srv.file("default", "durable/crashed.txt").read_text().splitlines()
    assert len(crashed) == 20 and crashed == srv.file("default", "durable/plain.txt").read_text().splitlines()
    assert srv.http().get(f"/v1/processes/{durable['pid']}").json()["restarts"] == 20


def test_examples_mapreduce_and_chatroom(srv):
    caps = ["llm", "proc:spawn", "msg", "fs:write:mapreduce/*"]
    proc = srv.spawn(EXAMPLES / "mapreduce" / "coordinator.py", caps=caps, name="coordinator")
    assert srv.wait(proc["pid"], 300)["exit_code"] == 0, srv.log_of(proc["pid"])
    summary = srv.file("default", "mapreduce/summary.txt").read_text().splitlines()
    assert len(summary) == 4 and all(line.split(". ", 1)[1].strip() for line in summary)
    workers = [p for p in srv.http().get("/v1/processes", params={"all": True}).json()["data"]
               if p["ppid"] == proc["pid"]]
    assert len(workers) == 4 and all(w["exit_code"] == 0 and w["output_tokens"] > 0 for w in workers)
    assert all(set(w["caps"]) == {"llm", "msg:send:coordinator"} for w in workers)

    # As from another machine: the CLI uploads the directory into the tenant's storage, and the
    # host spawns its sibling speaker.py from there.
    run = srv.cli("run", str(EXAMPLES / "chatroom" / "host.py"), "--dir", str(EXAMPLES / "chatroom"),
                  "--cap", "llm", "--cap", "proc:spawn",
                  "--cap", "msg", "--cap", "fs:write:chatroom/*", "--wait", "--", "2")
    pid = int(run.stdout.splitlines()[0])
    transcript = srv.file("default", "chatroom/transcript.txt").read_text().splitlines()
    assert len(transcript) == 6, transcript
    assert sorted(line.split(":")[0] for line in transcript) == ["0 ada", "0 bob", "0 cy", "1 ada", "1 bob", "1 cy"]
    rows = json.loads(srv.cli("ps", "--all", "--json").stdout)
    assert {"pid", "name", "state", "exit_code", "restarts", "tenant", "priority", "caps"} <= set(rows[0])
    assert next(r for r in rows if r["pid"] == pid)["exit_code"] == 0


def test_cli_runs_and_steers_a_process(srv, tmp_path):
    p = program(tmp_path, "echo.py", """
        m = agent.recv(timeout=60)
        print("got", m.body, flush=True)
        agent.ack(m)
        time.sleep(60)
    """)
    run = srv.cli("run", os.path.relpath(p, srv.tmp), "--name", "echo", "--cap", "msg")   # relative to the caller
    pid = int(run.stdout.splitlines()[0])
    assert srv.cli("send", "echo", '{"x": 1}').stdout.strip().isdigit()
    assert wait_for(lambda: "got {'x': 1}" in srv.cli("logs", str(pid)).stdout, 30)
    srv.cli("renice", str(pid), "--priority", "3", "--weight", "2")
    row = srv.http().get(f"/v1/processes/{pid}").json()
    assert (row["priority"], row["weight"], row["caps"]) == (3, 2.0, ["msg"])
    assert "suspended" in srv.cli("suspend", str(pid)).stdout
    assert srv.cli("resume", str(pid)).stdout.split(": ")[1].strip() in ("running", "blocked")
    srv.cli("kill", str(pid))
    assert srv.cli("wait", str(pid), check=False).returncode == 128 + signal.SIGTERM
    bad = srv.cli("kill", "999999", check=False)
    assert bad.returncode == 1 and "no process" in bad.stderr


def test_a_tenant_sees_and_steers_only_its_own_processes(srv, tmp_path):
    key_a, key_b = srv.create_key("team-a"), srv.create_key("team-b")
    assert srv.http(key_a).put("/v1/fs/wait.py", content=b"import time\ntime.sleep(60)\n").status_code == 200
    proc = srv.spawn("wait.py", key=key_a, name="mine")      # a tenant key runs programs from its storage
    assert proc["tenant"] == "team-a"
    b = srv.http(key_b)
    assert b.get(f"/v1/processes/{proc['pid']}").status_code == 404
    assert b.post(f"/v1/processes/{proc['pid']}/kill").status_code == 404
    assert all(p["tenant"] == "team-b" for p in b.get("/v1/processes", params={"all": True}).json()["data"])
    assert b.post("/v1/messages", json={"to": "mine", "body": 1}).status_code == 404
    assert srv.http(key_a).post(f"/v1/processes/{proc['pid']}/kill").json()["ok"]


def test_audit_log_is_tamper_evident(srv):
    assert srv.cli("audit", "verify").returncode == 0
    db = sqlite3.connect(srv.agents_dir / "audit.db")
    rid = db.execute("SELECT id FROM audit ORDER BY id LIMIT 1 OFFSET 3").fetchone()[0]
    db.execute("UPDATE audit SET call = 'fs.read' WHERE id = ?", (rid,))
    db.commit()
    r = srv.cli("audit", "verify", check=False)
    assert r.returncode == 1 and str(rid) in r.stdout + r.stderr


def test_intrusion_detection_suspends_a_prober_and_blocks_bad_keys(srv, tmp_path):
    p = program(tmp_path, "prober.py", """
        for i in range(50):
            try:
                agent.fs.read(f"secret-{i}")
            except agent.PermissionDenied:
                pass
            except agent.AgentError:
                break
        time.sleep(30)
    """)
    proc = srv.spawn(p, caps=["llm"])
    assert wait_for(lambda: srv.http().get(f"/v1/processes/{proc['pid']}").json()["state"] == "suspended", 60)
    metrics = srv.http().get("/metrics").text
    assert "llmos_processes_flagged_total 1.0" in metrics or "llmos_processes_flagged 1.0" in metrics
    srv.http().post(f"/v1/processes/{proc['pid']}/kill")
    bad = httpx.Client(base_url=srv.url, headers={"Authorization": "Bearer sk-llmos-wrong"})
    codes = [bad.get("/v1/models").status_code for _ in range(12)]
    assert codes[0] == 401 and codes[-1] == 429      # bad keys from loopback are refused now (valid keys are still served)


def test_kernel_sigkill_loses_no_message_and_restarts_always_agents(tmp_path, default_model_path):
    """kill -9 of `llmos serve` with messages in flight and a restart=always consumer: the
    next kernel kills the orphan (no agent runs twice), restarts the consumer, and every
    message is delivered (duplicates allowed, and counted)."""
    consumer = program(tmp_path, "consumer.py", """
        while True:
            m = agent.recv(timeout=60)
            if m is not None:
                agent.fs.append("recovery/got.txt", f"{m.body['n']}\\n")
                agent.ack(m)
    """)
    s1 = AgentServer(tmp_path)
    try:
        pid = s1.spawn(consumer, name="consumer", restart="always")["pid"]
        with s1.http() as http:
            for n in range(30):
                assert http.post("/v1/messages", json={"to": "consumer", "body": {"n": n}}).status_code == 200
            old = http.get(f"/v1/processes/{pid}").json()["os_pid"]
    finally:
        s1.stop(signal.SIGKILL)
    s2 = AgentServer(tmp_path)
    try:
        assert wait_for(lambda: not Path(f"/proc/{old}").exists(), 10), "the old kernel's agent still runs"
        row = wait_for(lambda: (r := s2.http().get(f"/v1/processes/{pid}").json())["state"] in ("running", "blocked")
                       and r["os_pid"] != old and r)
        assert row and row["restarts"] >= 1 and row["name"] == "consumer"
        with s2.http() as http:
            for n in range(30, 40):
                assert http.post("/v1/messages", json={"to": "consumer", "body": {"n": n}}).status_code == 200
        got = s2.file("default", "recovery/got.txt")
        assert wait_for(lambda: got.exists() and {int(x) for x in got.read_text().split()} == set(range(40)), 60), \
            got.read_text() if got.exists() else "nothing received"
        seen = [int(x) for x in got.read_text().split()]
        print(f"delivered 40 messages, {len(seen) - 40} duplicates")
        s2.http().post(f"/v1/processes/{pid}/kill")
    finally:
        assert s2.stop() == 0, s2.log.read_text()
