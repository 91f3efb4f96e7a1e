"""The durable-execution journal on a real SQLite file: outcomes recorded and replayed in
order, a changed program caught, entries surviving a crash, one side effect per step."""

from __future__ import annotations

import threading
import time

import pytest

from llmos.errors import InvalidRequestError
from llmos.kernel.journal import Journal, Nondeterminism, digest


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "journal.db")
    yield j
    j.close()


def run(journal: Journal, pid: int, seq: int, call: str, args: dict, effect):
    """What the syscall layer does for a durable process: replay if the step is journalled,
    else run the side effect and record its outcome (errors included)."""
    d = digest(args)
    with journal.claim(pid, seq):
        entry = journal.lookup(pid, seq, call, d)
        if entry is None:
            try:
                result = effect()
            except ValueError as e:
                entry = journal.record(pid, seq, call, d, error={"type": "ValueError", "message": str(e)})
            else:
                entry = journal.record(pid, seq, call, d, result=result)
    return entry


def test_record_then_lookup(journal):
    before = time.time()
    assert journal.lookup(5, 0, "llm.chat", digest({"prompt": "hi"})) is None
    journal.record(5, 0, "llm.chat", digest({"prompt": "hi"}), result={"text": "hello", "tokens": [1, 2]})
    e = journal.lookup(5, 0, "llm.chat", digest({"prompt": "hi"}))
    assert (e.pid, e.seq, e.call, e.result, e.error) == (5, 0, "llm.chat", {"text": "hello", "tokens": [1, 2]}, None)
    assert before <= e.time <= time.time()
    assert journal.lookup(5, 1, "llm.chat", digest({"prompt": "hi"})) is None
    assert journal.lookup(6, 0, "llm.chat", digest({"prompt": "hi"})) is None


def test_digest_ignores_key_order_and_sees_every_value():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2}) != digest({"a": "1"})
    with pytest.raises(InvalidRequestError, match="args"):
        digest({"data": b"bytes"})


def test_a_restarted_program_replays_results_and_errors_without_repeating_effects(journal):
    effects = []

    def program(pid):
        out = [run(journal, pid, 0, "fs.append", {"path": "log", "data": "a"}, lambda: effects.append("a") or 1),
               run(journal, pid, 1, "llm.chat", {"prompt": "x"}, lambda: effects.append("chat") or "reply"),
               run(journal, pid, 2, "fs.read", {"path": "missing"}, lambda: effects.append("read") or int("x"))]
        return [(e.result, e.error) for e in out]

    first = program(9)
    assert effects == ["a", "chat", "read"]
    assert first[2][0] is None and first[2][1]["type"] == "ValueError"
    assert program(9) == first                               # replayed: same outcomes...
    assert effects == ["a", "chat", "read"]                  # ...and nothing ran again
    run(journal, 9, 3, "proc.exit", {}, lambda: effects.append("exit"))   # then new ground runs
    assert effects[-1] == "exit"
    assert [e.seq for e in journal.entries(9)] == [0, 1, 2, 3]


def test_a_changed_program_is_caught(journal):
    journal.record(5, 3, "fs.append", digest({"path": "log", "data": "a"}), result=None)
    with pytest.raises(Nondeterminism) as e:
        journal.lookup(5, 3, "llm.chat", digest({"prompt": "x"}))
    assert "process 5 step 3: the journal has fs.append(...) but the program now calls llm.chat" in str(e.value)
    assert "same order" in str(e.value)
    with pytest.raises(Nondeterminism, match="process 5 step 3: .*fs.append.*other arguments"):
        journal.lookup(5, 3, "fs.append", digest({"path": "log", "data": "b"}))


def test_record_is_idempotent_but_refuses_a_conflicting_duplicate(journal):
    d = digest({"path": "x"})
    journal.record(1, 0, "fs.read", d, result="abc")
    journal.record(1, 0, "fs.read", d, result="abc")
    assert journal.size() == 1
    with pytest.raises(Nondeterminism, match="different outcome"):
        journal.record(1, 0, "fs.read", d, result="abd")
    with pytest.raises(Nondeterminism, match="llm.chat"):
        journal.record(1, 0, "llm.chat", d, result="abc")
    with pytest.raises(Nondeterminism):
        journal.record(1, 0, "fs.read", d, error={"type": "NotFound"})
    assert journal.lookup(1, 0, "fs.read", d).result == "abc"


def test_entries_survive_a_crash(tmp_path):
    crashed = Journal(tmp_path / "j.db")          # never closed, as when the kernel dies
    crashed.record(4, 0, "llm.chat", digest({}), result={"text": "kept"})
    crashed.record(4, 1, "fs.write", digest({}), error={"type": "QuotaExceeded", "message": "full"})
    reopened = Journal(tmp_path / "j.db")
    assert reopened.lookup(4, 0, "llm.chat", digest({})).result == {"text": "kept"}
    assert reopened.lookup(4, 1, "fs.write", digest({})).error == {"type": "QuotaExceeded", "message": "full"}
    assert reopened.size() == 2
    reopened.close()
    crashed.close()


def test_prune(journal):
    for pid in (1, 2, 3):
        for seq in range(pid):
            journal.record(pid, seq, "llm.chat", digest({}), result=seq)
    assert journal.size() == 6
    assert journal.prune(2) == 2
    assert journal.entries(2) == [] and journal.lookup(2, 0, "llm.chat", digest({})) is None
    assert journal.prune_exited([1, 3, 99]) == 4
    assert journal.size() == 0
    assert journal.prune(1) == 0


def test_bad_arguments_are_refused(journal):
    with pytest.raises(InvalidRequestError, match="seq"):
        journal.record(1, -1, "llm.chat", digest({}))
    with pytest.raises(InvalidRequestError, match="pid"):
        journal.lookup(True, 0, "llm.chat", digest({}))
    with pytest.raises(InvalidRequestError, match="result"):
        journal.record(1, 0, "llm.chat", digest({}), result=object())
    with pytest.raises(InvalidRequestError, match="error"):
        journal.record(1, 0, "llm.chat", digest({}), error="boom")
    assert journal.size() == 0


def test_a_step_claimed_twice_at_once_runs_its_effect_once(journal):
    ran = []
    barrier = threading.Barrier(8)

    def effect():
        ran.append(1)
        time.sleep(0.05)                          # a slow side effect that retries pile onto
        return "done"

    def retry(results):
        barrier.wait()
        results.append(run(journal, 7, 0, "fs.append", {"data": "x"}, effect).result)

    results: list = []
    threads = [threading.Thread(target=retry, args=(results,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ran == [1]
    assert results == ["done"] * 8


def test_other_steps_do_not_wait_for_a_claimed_one(journal):
    def claim_elsewhere(pid, seq, done):
        with journal.claim(pid, seq):
            done.set()

    with journal.claim(1, 0):
        for pid, seq in ((2, 0), (1, 1)):
            done = threading.Event()
            t = threading.Thread(target=claim_elsewhere, args=(pid, seq, done))
            t.start()
            assert done.wait(2), (pid, seq)
            t.join()
