"""The tamper-evident audit log (llmos.kernel.audit), tampered with through SQLite directly,
and intrusion detection on its stream (llmos.kernel.intrusion)."""

from __future__ import annotations

import json
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from contextlib import closing

import pytest

from llmos.errors import InvalidRequestError, LLMOSError
from llmos.kernel.audit import AuditLog, digest
from llmos.kernel.intrusion import IntrusionDetector


@pytest.fixture
def paths(tmp_path):
    return tmp_path / "audit.db", tmp_path / "audit.key"


def tamper(path, sql: str, *params) -> None:
    """What an intruder with write access to the file (but not the key) can do."""
    with closing(sqlite3.connect(path)) as db:
        assert db.execute(sql, params).rowcount >= 1
        db.commit()


def busy_log(paths, n: int = 10) -> AuditLog:
    """n calls, most finished out of order, call 4 denied, call 9 still running."""
    log = AuditLog(*paths)
    ids = [log.begin(100 + i % 3, "acme", "fs.write", {"path": f"/f{i}"}, allowed=i != 4,
                     reason="missing capability fs.write" if i == 4 else None) for i in range(1, n + 1)]
    for rid in reversed(ids[:-2]):
        log.finish(rid, "PermissionError" if rid == 4 else "ok", 0.25)
    log.finish(ids[-2], "ok", 1)
    log.flush()                    # on disk, where an intruder finds it
    return log


def test_records_read_back_as_written(paths):
    log = AuditLog(*paths)
    start = time.time()
    rid = log.begin(42, "acme", "msg.send", {"to": "worker", "body": [1, 2]}, allowed=True)
    denied = log.begin(42, "acme", "fs.read", {"path": "/etc/passwd"}, allowed=False,
                       reason="missing capability fs.read")
    log.finish(rid, "ok", 0.5)
    log.finish(denied, "PermissionError", 0)
    running = log.begin(None, "globex", "llm.generate", {"prompt": "hi"}, allowed=True)
    a, b, c = log.query()
    assert (a.id, a.pid, a.tenant, a.call, a.allowed, a.reason, a.outcome, a.duration) == \
        (rid, 42, "acme", "msg.send", True, None, "ok", 0.5)
    assert a.args_digest == digest({"body": [1, 2], "to": "worker"})
    assert start <= a.time <= time.time() and len(a.hash) == 64
    assert (b.allowed, b.reason, b.outcome, b.duration) == (False, "missing capability fs.read", "PermissionError", 0.0)
    assert (c.id, c.pid, c.outcome, c.duration) == (running, None, None, None)
    assert log.count() == 3


def test_query_filters_newest_last(paths):
    log = busy_log(paths)
    assert [r.id for r in log.query(denied=True)] == [4]
    assert [r.id for r in log.query(denied=False, limit=3)] == [8, 9, 10]
    assert [r.id for r in log.query(pid=101)] == [1, 4, 7, 10]
    assert [r.id for r in log.query(pid=101, denied=False)] == [1, 7, 10]
    log.begin(1, "globex", "proc.spawn", {}, allowed=True)
    assert [r.id for r in log.query(tenant="globex")] == [11]
    assert [r.id for r in log.query(call="proc.spawn")] == [11]
    assert [r.id for r in log.query(since=time.time() + 1)] == []
    assert len(log.query(since=0)) == 11


def test_digest_is_canonical():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})
    assert len(digest({"data": b"\x00", "s": {1}})) == 64          # non-JSON values go in as repr
    assert digest({1: "x", "y": 2}) == digest({1: "x", "y": 2})    # keys that cannot be sorted


def test_untouched_log_verifies(paths):
    log = busy_log(paths)
    assert log.verify() == type(log.verify())(True, 10, None, None)


@pytest.mark.parametrize("column, value", [("tenant", "globex"), ("call", "fs.read"), ("allowed", 1),
                                           ("reason", None), ("pid", 1), ("time", 0.0), ("args_digest", "0" * 64)])
def test_altered_call_is_named(paths, column, value):
    log = busy_log(paths)
    tamper(paths[0], f"UPDATE audit SET {column} = ? WHERE id = 4", value)
    result = log.verify()
    assert (result.ok, result.first_bad, result.problem) == (False, 4, "record 4 was altered")


@pytest.mark.parametrize("column, value", [("outcome", "ok"), ("duration", 99.0), ("outcome", None)])
def test_altered_result_is_named(paths, column, value):
    log = busy_log(paths)
    tamper(paths[0], f"UPDATE audit SET {column} = ? WHERE id = 4", value)
    result = log.verify()
    assert (result.ok, result.first_bad, result.problem) == (False, 4, "record 4 was altered")


def test_rewritten_hash_is_named(paths):
    log = busy_log(paths)
    tamper(paths[0], "UPDATE audit SET hash = ? WHERE id = 6", "f" * 64)
    assert log.verify().problem == "record 6 was altered"


def test_removed_record_is_named(paths):
    log = busy_log(paths)
    tamper(paths[0], "DELETE FROM audit WHERE id = 5")
    result = log.verify()
    assert (result.ok, result.checked, result.first_bad, result.problem) == (False, 9, 5, "record 5 is missing")


def test_removed_newest_record_is_named(paths):
    log = busy_log(paths)
    tamper(paths[0], "DELETE FROM audit WHERE id = 10")
    assert log.verify().problem == "record 10 is missing from the end of the log (the signed head says 10)"


def test_erased_result_is_named(paths):
    log = busy_log(paths)
    tamper(paths[0], "UPDATE audit SET done_seq = NULL, outcome = NULL, duration = NULL, done_hash = NULL "
                     "WHERE id = 4")
    result = log.verify()
    assert (result.ok, result.first_bad) == (False, 4)
    assert result.problem.startswith("record 4 was altered: its result")


def test_reopened_log_continues_the_chain(paths):
    busy_log(paths)
    log = AuditLog(*paths)
    assert log.verify().ok
    rid = log.begin(7, "acme", "tool.call", {"name": "search"}, allowed=True)
    assert rid == 11
    log.finish(10, "ok", 2.0)                             # begun before the restart
    log.finish(rid, "ok", 0.1)
    assert log.verify() == type(log.verify())(True, 11, None, None)
    assert AuditLog(*paths).verify().ok
    tamper(paths[0], "UPDATE audit SET outcome = 'TimeoutError' WHERE id = 10")
    assert AuditLog(*paths).verify().problem == "record 10 was altered"


def test_key_file_is_private_and_needed(paths, tmp_path):
    busy_log(paths)
    mode = paths[1].stat().st_mode
    assert stat.S_IMODE(mode) == 0o600 and len(paths[1].read_bytes()) == 32
    assert AuditLog(*paths).verify().ok                   # the same key is read back
    forged = AuditLog(paths[0], tmp_path / "other.key")   # a log rebuilt without the key cannot verify
    assert forged.verify().problem == "record 1 was altered"


def test_finish_needs_a_running_record(paths):
    log = AuditLog(*paths)
    rid = log.begin(1, "acme", "fs.write", {}, allowed=True)
    log.finish(rid, "ok", 0.1)
    with pytest.raises(InvalidRequestError, match="record_id: 1 is not an audit record awaiting"):
        log.finish(rid, "ok", 0.1)
    with pytest.raises(InvalidRequestError):
        log.finish(99, "ok", 0.1)
    assert log.verify().ok


def test_concurrent_syscalls_keep_one_chain(paths):
    log = AuditLog(*paths)

    def agent(pid):
        for i in range(100):
            rid = log.begin(pid, "acme", "mem.put", {"i": i}, allowed=i % 10 != 0)
            log.finish(rid, "ok", 0.001)

    threads = [threading.Thread(target=agent, args=(pid,)) for pid in range(4)]
    for t in threads:
        t.start()
    verdicts = [log.verify() for _ in range(3)]            # verifying while they write
    for t in threads:
        t.join()
    assert all(v.ok for v in verdicts)
    assert log.count() == 400 and [r.id for r in log.query()] == list(range(1, 401))
    assert len(log.query(denied=True)) == 40
    assert log.verify().ok


def closed_log(paths, n: int) -> None:
    """A kernel that logged n calls and shut down."""
    log = AuditLog(*paths)
    for i in range(n):
        log.finish(log.begin(1, "acme", "msg.send", {"i": i}, allowed=True), "ok", 0.001)
    log.close()


def test_rows_cut_off_while_no_kernel_runs_are_named(paths):
    closed_log(paths, 57)
    tamper(paths[0], "DELETE FROM audit WHERE id > 40")
    log = AuditLog(*paths)
    result = log.verify()
    assert (result.ok, result.checked, result.first_bad, result.problem) == \
        (False, 40, 41, "records 41-57 are missing from the end of the log (the signed head says 57)")
    rid = log.begin(1, "acme", "fs.read", {}, allowed=True)   # the kernel goes on after the signed head,
    log.finish(rid, "ok", 0.1)                                 # so the cut stays a gap
    log.close()
    assert rid == 58
    for _ in range(2):
        assert AuditLog(*paths).verify().problem == "records 41-57 are missing"


def test_a_single_newest_row_cut_off_is_named(paths):
    closed_log(paths, 3)
    tamper(paths[0], "DELETE FROM audit WHERE id = 3")
    result = AuditLog(*paths).verify()
    assert (result.first_bad, result.problem) == \
        (3, "record 3 is missing from the end of the log (the signed head says 3)")


def test_a_cut_off_result_is_named(paths):
    closed_log(paths, 3)
    tamper(paths[0], "UPDATE audit SET done_seq = NULL, outcome = NULL, duration = NULL, done_hash = NULL "
                     "WHERE id = 3")
    result = AuditLog(*paths).verify()
    assert (result.ok, result.first_bad, result.problem) == \
        (False, 3, "record 3 was altered: its result (event 6) was removed")


def head_path(paths):
    return paths[0].with_suffix(".head")


@pytest.mark.parametrize("forge", [
    lambda head: {**head, "last_id": 40, "last_seq": 80},           # lowered to match a cut
    lambda head: {**head, "mac": "0" * 64},
    lambda head: "not a head",
])
def test_altered_head_is_reported_after_every_start(paths, forge):
    closed_log(paths, 57)
    path = head_path(paths)
    path.write_text(json.dumps(forge(json.loads(path.read_text()))))
    tamper(paths[0], "DELETE FROM audit WHERE id > 40")
    for _ in range(3):                            # each start signs a new head: the problem goes with it
        log = AuditLog(*paths)
        result = log.verify()
        assert (result.ok, result.first_bad, result.problem) == (False, None, "the signed head audit.head was altered")
        log.finish(log.begin(1, "acme", "fs.read", {}, allowed=True), "ok", 0.1)
        log.close()


def test_missing_head_is_reported_unless_the_log_is_empty(paths):
    log = AuditLog(*paths)                        # a new log is signed at once, empty
    assert json.loads(head_path(paths).read_text())["last_id"] == 0 and log.verify().ok
    log.close()
    head_path(paths).unlink()
    assert AuditLog(*paths).verify().ok
    closed_log(paths, 5)
    head_path(paths).unlink()
    for _ in range(2):
        result = AuditLog(*paths).verify()
        assert (result.ok, result.first_bad, result.problem) == (False, None, "the signed head audit.head is missing")


def test_head_is_signed_after_each_batch(paths):
    closed_log(paths, 5)
    head = json.loads(head_path(paths).read_text())
    assert (head["last_id"], head["last_seq"], head["problem"]) == (5, 10, None)
    result = AuditLog(*paths).verify()
    assert (result.ok, result.checked) == (True, 5)


def test_query_count_and_verify_see_what_was_just_logged(paths):
    log = AuditLog(*paths, interval=3600)         # the flusher would not come round during the test
    rid = log.begin(7, "acme", "fs.write", {"path": "a"}, allowed=True)
    assert [r.id for r in log.query()] == [rid] and log.query()[0].outcome is None
    log.finish(rid, "ok", 0.1)
    assert log.query(pid=7)[0].outcome == "ok" and log.count() == 1
    log.begin(7, "acme", "fs.read", {}, allowed=False, reason="missing capability fs.read")
    assert log.verify() == type(log.verify())(True, 2, None, None)


def test_closed_log_writes_everything_out_and_takes_no_more(paths):
    log = AuditLog(*paths, interval=3600)
    rids = [log.begin(1, "acme", "kv.put", {"i": i}, allowed=True) for i in range(5)]
    log.finish(rids[0], "ok", 0.1)
    log.close()
    with pytest.raises(LLMOSError, match="closed"):
        log.begin(1, "acme", "kv.put", {}, allowed=True)
    reopened = AuditLog(*paths)
    assert reopened.count() == 5 and reopened.verify().ok
    reopened.finish(rids[1], "ok", 0.2)                   # begun before the shutdown
    assert reopened.verify().ok


def test_crash_loses_the_last_batch_without_looking_tampered(paths):
    """A kernel killed between batches: what it had not written yet is gone, and that is no cut tail."""
    code = f"""if True:
        import os
        from llmos.kernel.audit import AuditLog
        log = AuditLog({str(paths[0])!r}, {str(paths[1])!r}, interval=3600)
        for i in range(4):
            log.finish(log.begin(1, "acme", "kv.put", {{"i": i}}, allowed=True), "ok", 0.1)
        log.flush()
        log.begin(1, "acme", "kv.put", {{}}, allowed=True)
        os._exit(9)"""
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    log = AuditLog(*paths)
    assert log.verify() == type(log.verify())(True, 4, None, None)
    assert log.begin(1, "acme", "kv.put", {}, allowed=True) == 5


@pytest.mark.parametrize("max_batch", [1000, 7])
def test_group_commit_keeps_one_exact_chain_under_concurrent_writers(paths, max_batch):
    log = AuditLog(*paths, interval=0.002, max_batch=max_batch)

    def agent(pid):
        for i in range(150):
            rid = log.begin(pid, "acme", "msg.send", {"i": i}, allowed=True)
            log.finish(rid, "ok", 0.001)

    threads = [threading.Thread(target=agent, args=(pid,)) for pid in range(8)]
    for t in threads:
        t.start()
    verdicts = [log.verify() for _ in range(3)]
    for t in threads:
        t.join()
    log.close()
    assert all(v.ok for v in verdicts), verdicts
    with closing(sqlite3.connect(paths[0])) as db:
        seqs = sorted(s for row in db.execute("SELECT seq, done_seq FROM audit") for s in row)
    assert seqs == list(range(1, 2401))
    head = json.loads(head_path(paths).read_text())
    assert (head["last_id"], head["last_seq"]) == (1200, 2400)
    result = AuditLog(*paths).verify()
    assert (result.ok, result.checked) == (True, 1200)


@pytest.mark.slow
def test_cli_names_rows_cut_off_while_the_server_was_down(tmp_path, default_model_path):
    """`llmos audit verify` against a real server that was stopped, had its newest audit rows
    deleted, and was started again."""
    from test_agents import AgentServer
    srv = AgentServer(tmp_path)
    try:
        with srv.http() as http:
            for i in range(5):
                r = http.post("/v1/tools/calculator/call", json={"arguments": {"expression": f"{i} + 1"}})
                assert r.status_code == 200, r.text
        assert srv.cli("audit", "verify").returncode == 0
    finally:
        assert srv.stop() == 0, srv.log.read_text()
    db = srv.agents_dir / "audit.db"
    with closing(sqlite3.connect(db)) as conn:
        last = conn.execute("SELECT MAX(id) FROM audit").fetchone()[0]
    tamper(db, "DELETE FROM audit WHERE id > ?", last - 3)
    srv = AgentServer(tmp_path)
    try:
        r = srv.cli("audit", "verify", check=False)
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"first bad record {last - 2}: records {last - 2}-{last} are missing from the end of the log" in r.stdout
    finally:
        assert srv.stop() == 0, srv.log.read_text()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_of_denials_flags_the_process_once():
    clock = FakeClock()
    ids = IntrusionDetector(denial_threshold=5, denial_window=10, clock=clock)
    assert [ids.denied(7) for _ in range(4)] == [False] * 4
    assert ids.denied(8) is False                         # another process counts on its own
    assert ids.denied(7) is True
    assert [ids.denied(7) for _ in range(10)] == [False] * 10
    assert ids.flagged == {7}
    assert (ids.processes_flagged, ids.denials) == (1, 16)


def test_denials_spread_over_time_are_not_an_attack():
    clock = FakeClock()
    ids = IntrusionDetector(denial_threshold=5, denial_window=10, clock=clock)
    for _ in range(50):
        assert ids.denied(7) is False
        clock.now += 3                                    # five denials span 12 s > 10 s
    assert ids.flagged == set() and ids.processes_flagged == 0


def test_failed_api_keys_block_the_address_for_a_while():
    clock = FakeClock()
    ids = IntrusionDetector(auth_threshold=3, auth_window=60, block_seconds=300, clock=clock)
    ids.auth_failed("10.0.0.1")
    ids.auth_failed("10.0.0.1")
    ids.auth_failed("10.0.0.2")
    assert ids.blocked("10.0.0.1") is None
    clock.now += 30
    ids.auth_failed("10.0.0.1")
    assert ids.blocked("10.0.0.1") == 300 and ids.blocked("10.0.0.2") is None
    clock.now += 100
    ids.auth_failed("10.0.0.1")                           # while blocked: the block is not extended
    assert ids.blocked("10.0.0.1") == 200
    clock.now += 200
    assert ids.blocked("10.0.0.1") is None
    ids.auth_failed("10.0.0.1")                           # a fresh start after the block
    assert ids.blocked("10.0.0.1") is None
    assert ids.addresses_blocked == 1


def test_slow_key_guessing_is_not_blocked():
    clock = FakeClock()
    ids = IntrusionDetector(auth_threshold=3, auth_window=60, clock=clock)
    for _ in range(20):
        ids.auth_failed("10.0.0.1")
        clock.now += 31
        assert ids.blocked("10.0.0.1") is None
    assert ids.addresses_blocked == 0
