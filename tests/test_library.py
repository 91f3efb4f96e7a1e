"""The function library, storage and long-term memory end to end on the real model: a real
`llmos serve` with a tools module and an MCP server in its TOML config, agents calling
tools, memory and the key-value store through system calls, people deciding approvals
with the CLI, and HTTP clients using the same through the OpenAI-style API."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from llmos.tools.calculator import calculate
from test_agents import AgentServer, program

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def lib(tmp_path_factory, default_model_path):
    tmp = tmp_path_factory.mktemp("library")
    ledger = tmp / "ledger.txt"
    ledger.touch()
    import os
    os.environ["LLMOS_TEST_LEDGER"] = str(ledger)
    extra = {"tools": {"modules": [str(HERE / "tool_fixtures.py")], "workers": 2, "timeout": 20.0},
             "mcp_servers": [{"name": "echo", "command": [sys.executable, str(HERE / "mcp_echo_server.py")]}]}
    s = AgentServer(tmp, extra=extra)
    s.ledger = ledger
    yield s
    assert s.stop() == 0, s.log.read_text()


def call(srv, name, key=None, **args):
    return srv.http(key).post(f"/v1/tools/{name}/call", json={"arguments": args})


def test_tools_listed_with_schemas_from_type_hints(lib):
    tools = {t["name"]: t for t in lib.http().get("/v1/tools").json()["data"]}
    for name in ("calculator", "clock", "python", "fs.read", "fs.write", "memory.remember", "memory.recall",
                 "typed", "hang", "crash", "transfer"):
        assert name in tools, sorted(tools)
    assert "http.get" not in tools                    # off unless the config allows hosts
    typed = tools["typed"]
    assert typed["description"] == "Echo typed arguments back."
    props = typed["parameters"]["properties"]
    assert props["n"]["type"] == "integer" and props["tags"] == {"type": "array", "items": {"type": "string"},
                                                                "description": "labels to attach"}
    assert props["mode"]["enum"] == ["fast", "slow"] and props["mode"]["default"] == "fast"
    assert sorted(typed["parameters"]["required"]) == ["n", "tags"]
    assert tools["transfer"]["needs_approval"] and not tools["typed"]["needs_approval"]
    assert tools["fs.read"]["function_name"] == "fs_read"
    deadline = time.monotonic() + 30          # the MCP server connects in the background
    while "mcp.echo.add" not in tools and time.monotonic() < deadline:
        time.sleep(0.5)
        tools = {t["name"]: t for t in lib.http().get("/v1/tools").json()["data"]}
    assert tools["mcp.echo.add"]["source"] == "mcp"
    assert set(tools["mcp.echo.add"]["parameters"]["properties"]) == {"a", "b"}


def test_arguments_are_validated_before_the_call(lib):
    r = call(lib, "typed", n="three", tags="x", extra=1)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_tool_arguments"
    msg = r.json()["error"]["message"]
    assert "n:" in msg and "tags:" in msg and "extra: unexpected argument" in msg, msg
    r = call(lib, "typed", n="3", tags=["a"])            # lax mode: "3" is a fine integer
    assert r.status_code == 200 and r.json()["result"] == {"n": 3, "tags": ["a"], "mode": "fast", "ratio": None}
    assert call(lib, "nope").json()["error"]["code"] == "tool_not_found"
    assert call(lib, "calculator", expression="2 * (3 + 4) ** 2").json()["result"] == 98
    r = call(lib, "calculator", expression="__import__('os').system('true')")
    assert r.status_code == 400 and "unsupported syntax" in r.json()["error"]["message"]


def test_hung_and_crashing_tools_cost_their_caller_an_error_not_a_worker(lib):
    # Two workers; three hung calls in a row, then quick calls still run.
    for _ in range(3):
        t0 = time.monotonic()
        r = call(lib, "hang", seconds=30)
        assert r.status_code == 424 and r.json()["error"]["code"] == "tool_timeout", r.text
        assert time.monotonic() - t0 < 10
    r = call(lib, "crash", message="boom")
    assert r.status_code == 424 and "tool crashed: boom" in r.json()["error"]["message"]
    assert call(lib, "calculator", expression="1+1").json()["result"] == 2
    metrics = lib.http().get("/metrics").text
    timeouts = next(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith('llmos_tool_calls_total{outcome="timeout"}'))
    assert timeouts >= 3 and "llmos_tool_workers_stuck" in metrics and "llmos_approvals_pending" in metrics


def test_python_tool_runs_sandboxed_and_cannot_read_the_key_database(lib):
    r = call(lib, "python", code="print(sum(range(10)))")
    assert r.status_code == 200 and r.json()["result"].strip() == "45"
    r = call(lib, "python", code=f"print(open({str(lib.keys_db)!r}, 'rb').read()[:16])")
    assert r.status_code == 424, r.text
    assert "SQLite" not in r.text
    r = call(lib, "python", code="while True: pass", timeout=1)
    assert r.status_code == 424 and r.json()["error"]["code"] == "tool_timeout"


def test_mcp_tool_called_over_http_and_by_an_agent(lib, tmp_path):
    deadline = time.monotonic() + 30
    while True:
        r = call(lib, "mcp.echo.add", a=2, b=3)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.json()["result"] == 5, r.text
    p = program(tmp_path, "mcp_agent.py", """
        print(json.dumps({"sum": agent.call_tool("mcp.echo.add", a=20, b=22)}))
    """)
    proc = lib.spawn(p, caps=["tool:mcp.echo.*"])
    assert lib.wait(proc["pid"])["exit_code"] == 0, lib.log_of(proc["pid"])
    assert json.loads(lib.log_of(proc["pid"]).strip().splitlines()[-1]) == {"sum": 42}


def test_agent_tools_are_under_capabilities_and_audited(lib, tmp_path):
    p = program(tmp_path, "tools_agent.py", """
        out = {"tools": sorted(t["name"] for t in agent.tools()),
               "calc": agent.call_tool("calculator", expression="6*7")}
        for name, call in [("python", lambda: agent.call_tool("python", code="print(1)")),
                           ("bad_args", lambda: agent.call_tool("calculator", expr="1")),
                           ("crash", lambda: agent.call_tool("crash", message="x"))]:
            try:
                call()
                out[name] = "allowed"
            except agent.PermissionDenied as e:
                out[name] = "denied " + e.capability
            except agent.InvalidArgument as e:
                out[name] = "invalid " + str(e)
            except agent.ToolFailed as e:
                out[name] = "failed " + e.code
        print(json.dumps(out))
    """)
    proc = lib.spawn(p, caps=["tool:calculator", "tool:crash"])
    assert lib.wait(proc["pid"])["exit_code"] == 0, lib.log_of(proc["pid"])
    out = json.loads(lib.log_of(proc["pid"]).strip().splitlines()[-1])
    assert out["tools"] == ["calculator", "crash"] and out["calc"] == 42
    assert out["python"] == "denied tool:python"
    assert out["bad_args"].startswith("invalid calculator: invalid arguments") and out["crash"] == "failed tool_error"
    audit = lib.http().get("/v1/audit", params={"pid": proc["pid"], "call": "tool.call"}).json()["data"]
    assert [r["reason"] for r in audit if not r["allowed"]] == ["tool:python"]
    assert sorted(r["outcome"] for r in audit if r["allowed"]) == ["ToolArgumentError", "ToolError", "ok"], audit


def test_approval_blocks_the_process_runs_once_when_approved_and_refuses_when_denied(lib, tmp_path):
    p = program(tmp_path, "approver.py", """
        try:
            print(json.dumps({"ok": agent.call_tool("transfer", amount=int(sys.argv[1]), to="bob")}))
        except agent.ApprovalDenied as e:
            print(json.dumps({"denied": str(e), "id": e.approval_id}))
    """)
    results = {}
    for amount, verdict in ((5, "approve"), (7, "deny")):
        proc = lib.spawn(p, args=[str(amount)], caps=["tool:transfer"])
        deadline = time.monotonic() + 60
        pending = []
        while not pending and time.monotonic() < deadline:
            pending = [a for a in json.loads(lib.cli("approvals", "--json").stdout) if a["pid"] == proc["pid"]]
            time.sleep(0.2)
        assert pending and pending[0]["args"] == {"amount": amount, "to": "bob"}, pending
        assert lib.http().get(f"/v1/processes/{proc['pid']}").json()["state"] == "waiting-approval"
        lib.cli(verdict, pending[0]["id"], "--reason", "test")
        assert lib.wait(proc["pid"])["exit_code"] == 0, lib.log_of(proc["pid"])
        results[verdict] = json.loads(lib.log_of(proc["pid"]).strip().splitlines()[-1])
        r = lib.cli(verdict, pending[0]["id"], check=False)          # a decision is final
        assert r.returncode != 0 and "already" in r.stderr
    assert results["approve"] == {"ok": {"sent": 5, "to": "bob"}}
    assert results["deny"]["id"] and "denied" in results["deny"]["denied"] and "test" in results["deny"]["denied"]
    assert lib.ledger.read_text() == "5 bob\n"                        # ran once; the denied one never


def test_memory_is_isolated_between_processes_and_tenants(lib, tmp_path):
    p = program(tmp_path, "mem_agent.py", """
        mode = sys.argv[1]
        if mode == "write":
            agent.remember("The launch code word is pelican.", {"topic": "launch"})
            agent.remember("Lunch is served at noon in the blue room.", {"topic": "food"}, shared=True)
        hits = agent.recall("What is the launch code word?", k=3)
        print(json.dumps([{"text": m.text, "shared": m.shared, "score": m.score} for m in hits]))
    """)
    w = lib.spawn(p, args=["write"], caps=["mem", "mem:shared"])
    assert lib.wait(w["pid"])["exit_code"] == 0, lib.log_of(w["pid"])
    own = json.loads(lib.log_of(w["pid"]).strip().splitlines()[-1])
    assert own[0]["text"] == "The launch code word is pelican." and not own[0]["shared"]
    r = lib.spawn(p, args=["read"], caps=["mem"])          # another process, no mem:shared: sees nothing
    assert lib.wait(r["pid"])["exit_code"] == 0, lib.log_of(r["pid"])
    assert json.loads(lib.log_of(r["pid"]).strip().splitlines()[-1]) == []
    r = lib.spawn(p, args=["read"], caps=["mem", "mem:shared"])   # shared memory only, not the writer's own
    assert lib.wait(r["pid"])["exit_code"] == 0, lib.log_of(r["pid"])
    texts = [m["text"] for m in json.loads(lib.log_of(r["pid"]).strip().splitlines()[-1])]
    assert texts == ["Lunch is served at noon in the blue room."]
    other = lib.create_key("other-tenant")
    assert lib.http(other).post("/v1/memory/recall", json={"query": "lunch"}).json()["data"] == []
    mine = lib.http().post("/v1/memory/recall", json={"query": "when is lunch"}).json()["data"]
    assert mine[0]["text"].startswith("Lunch is served")
    denied = lib.spawn(p, args=["read"], caps=["llm"])
    lib.wait(denied["pid"])
    assert "lacks capability mem" in lib.log_of(denied["pid"])


def test_kv_store_and_fs_cli(lib, tmp_path):
    p = program(tmp_path, "kv_agent.py", """
        v = agent.kv.put("counters/runs", 1)
        try:
            agent.kv.put("counters/runs", 99, if_version=0)
            raced = False
        except agent.AgentError as e:
            raced = "version" in str(e)
        agent.kv.put("counters/runs", agent.kv.get("counters/runs") + 1, if_version=v)
        try:
            agent.kv.put("secrets/x", 1)
            denied = False
        except agent.PermissionDenied as e:
            denied = e.capability
        print(json.dumps({"runs": agent.kv.get("counters/runs"), "raced": raced, "denied": denied,
                          "keys": agent.kv.list("counters/")}))
    """)
    proc = lib.spawn(p, caps=["kv:counters/*"])
    assert lib.wait(proc["pid"])["exit_code"] == 0, lib.log_of(proc["pid"])
    out = json.loads(lib.log_of(proc["pid"]).strip().splitlines()[-1])
    assert out == {"runs": 2, "raced": True, "denied": "kv:secrets/x", "keys": ["counters/runs"]}
    assert lib.http().get("/v1/kv/counters/runs").json()["value"] == 2
    src = tmp_path / "notes.txt"
    src.write_text("hello files\n")
    assert "12 bytes" in lib.cli("fs", "put", "docs/notes.txt", str(src)).stdout
    assert "notes.txt" in lib.cli("fs", "ls", "docs").stdout
    assert lib.cli("fs", "cat", "docs/notes.txt").stdout == "hello files\n"
    lib.cli("fs", "rm", "docs/notes.txt")
    r = lib.cli("fs", "cat", "docs/notes.txt", check=False)
    assert r.returncode != 0 and "docs/notes.txt" in r.stderr
    r = lib.cli("fs", "cat", "../escape", check=False)
    assert r.returncode != 0 and "escape" in r.stderr


def test_agent_chat_runs_the_tool_loop(lib, tmp_path):
    p = program(tmp_path, "loop_agent.py", """
        r = agent.chat("What is 12 times 7? Use the calculator.", tools=["calculator"], execute_tools=True,
                       tool_choice="calculator", max_turns=1, max_tokens=40, temperature=0)
        print(json.dumps({"text": str(r), "trace": r.trace, "turns": r.turns}))
    """)
    proc = lib.spawn(p, caps=["llm", "tool:calculator"])
    assert lib.wait(proc["pid"])["exit_code"] == 0, lib.log_of(proc["pid"])
    out = json.loads(lib.log_of(proc["pid"]).strip().splitlines()[-1])
    step = out["trace"][0]
    assert step["name"] == "calculator" and out["turns"] == 2
    assert ("result" in step and step["result"] == calculate(step["arguments"]["expression"])) or "error" in step
    assert isinstance(out["text"], str)
    denied = program(tmp_path, "loop_denied.py", """
        try:
            agent.chat("hi", tools=["python"], execute_tools=True)
        except agent.PermissionDenied as e:
            print("denied", e.capability)
    """)
    proc = lib.spawn(denied, caps=["llm", "tool:calculator"])
    lib.wait(proc["pid"])
    assert "denied tool:python" in lib.log_of(proc["pid"])


def test_chat_completions_with_llmos_tools(lib):
    client = lib.client()
    model = client.models.list().data[0].id
    base = {"model": model, "messages": [{"role": "user", "content": "What is 3 + 4?"}], "max_tokens": 40,
            "temperature": 0, "tool_choice": {"type": "function", "function": {"name": "calculator"}}}
    r = client.chat.completions.create(**base, tools=[{"type": "llmos", "name": "calculator"}])
    call = r.choices[0].message.tool_calls[0]            # not executed: OpenAI's behaviour
    assert call.function.name == "calculator" and "expression" in json.loads(call.function.arguments)
    r = lib.http().post("/v1/chat/completions", json={**base, "tools": [{"type": "llmos", "name": "calculator"}],
                                                      "llmos_execute": True, "llmos_max_turns": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    step = body["llmos_trace"][0]
    assert step["name"] == "calculator" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["prompt_tokens"] > 0
    r = lib.http().post("/v1/chat/completions", json={**base, "tool_choice": "auto",
                                                      "tools": [{"type": "llmos", "name": "nope"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "tool_not_found"
    r = lib.http().post("/v1/chat/completions", json={**base, "stream": True, "llmos_execute": True,
                                                      "tools": [{"type": "llmos", "name": "calculator"}]})
    assert r.status_code == 400 and "llmos_execute" in r.json()["error"]["message"]


def test_conversation_longer_than_its_budget_pages_out_and_recalls(lib):
    http = lib.http()
    r = http.post("/v1/conversations", json={"name": "long", "budget": 256})
    assert r.status_code == 201, r.text
    facts = ["My sister's name is Oriane.", "I keep bees on the roof of the garage.",
             "The wifi password is tangerine-42."]
    paged = 0
    for i, text in enumerate(facts + [f"Tell me a one-line fact about the number {n}." for n in range(8)]):
        r = http.post("/v1/conversations/long/messages", json={"content": text, "max_tokens": 24, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["context_tokens"] <= 256
        paged += r.json()["paged_out"]
    assert paged > 0
    r = http.post("/v1/conversations/long/messages", json={"content": "What is the wifi password?", "max_tokens": 8})
    assert any("tangerine-42" in m for m in r.json()["recalled"]), r.json()
    info = http.get("/v1/conversations/long").json()
    assert info["turns"] == 24 and info["paged_out"] > 0 and info["summary"]
    assert lib.http(lib.create_key("tenant-z")).get("/v1/conversations/long").status_code == 400


def test_waiting_approval_survives_a_kernel_sigkill(tmp_path, default_model_path):
    """kill -9 of `llmos serve` while a durable agent waits for approval: the next kernel
    restarts the agent, which finds the same pending request; approving it then runs the
    tool exactly once."""
    import os
    import signal
    ledger = tmp_path / "ledger.txt"
    ledger.touch()
    os.environ["LLMOS_TEST_LEDGER"] = str(ledger)
    extra = {"tools": {"modules": [str(HERE / "tool_fixtures.py")]}}
    p = program(tmp_path, "payer.py", """
        r = agent.call_tool("transfer", amount=9, to="carol")
        agent.fs.write("approval/result.json", json.dumps(r))
    """)
    s1 = AgentServer(tmp_path, extra=extra)
    try:
        pid = s1.spawn(p, caps=["tool:transfer", "fs:write:approval/*"], restart="on-failure", durable=True)["pid"]
        deadline = time.monotonic() + 60
        pending = []
        while not pending and time.monotonic() < deadline:
            pending = s1.http().get("/v1/approvals", params={"state": "pending"}).json()["data"]
            time.sleep(0.2)
        assert pending, s1.log_of(pid)
    finally:
        s1.stop(signal.SIGKILL)
    s2 = AgentServer(tmp_path, extra=extra)
    try:
        again = s2.http().get("/v1/approvals", params={"state": "pending"}).json()["data"]
        assert [a["id"] for a in again] == [pending[0]["id"]]
        deadline = time.monotonic() + 60
        while s2.http().get(f"/v1/processes/{pid}").json()["state"] != "waiting-approval":
            assert time.monotonic() < deadline, s2.http().get(f"/v1/processes/{pid}").json()
            time.sleep(0.2)
        s2.cli("approve", pending[0]["id"])
        done = s2.wait(pid)
        assert done["exit_code"] == 0, s2.log_of(pid)
        assert json.loads(s2.file("default", "approval/result.json").read_text()) == {"sent": 9, "to": "carol"}
        assert ledger.read_text() == "9 carol\n"
        assert len(s2.http().get("/v1/approvals").json()["data"]) == 1
    finally:
        assert s2.stop() == 0, s2.log.read_text()


def test_agent_conversation_is_kept_by_the_kernel(lib, tmp_path):
    p = program(tmp_path, "conv_agent.py", """
        conv = agent.conversation("diary", budget=256)
        replies = [conv.send(text, max_tokens=12, temperature=0)
                   for text in ["My favourite colour is teal.", "I live on a houseboat.", "Say hi."]]
        info = conv.info()
        print(json.dumps({"replies": replies, "turns": info["turns"], "budget": info["budget"]}))
    """)
    proc = lib.spawn(p, caps=["llm"])
    assert lib.wait(proc["pid"])["exit_code"] == 0, lib.log_of(proc["pid"])
    out = json.loads(lib.log_of(proc["pid"]).strip().splitlines()[-1])
    assert out["turns"] == 6 and out["budget"] == 256 and all(isinstance(r, str) and r for r in out["replies"])
    # The same conversation, by name, for the tenant's HTTP clients.
    info = lib.http().get("/v1/conversations/diary").json()
    assert [t["content"] for t in info["working"] if t["role"] == "user"][0] == "My favourite colour is teal."
    denied = lib.spawn(p, caps=["mem"])
    lib.wait(denied["pid"])
    assert "lacks capability llm" in lib.log_of(denied["pid"])
