"""Durable mailboxes and topics (llmos.kernel.ipc): real SQLite files, real threads, and a
real SIGKILL of the process that owned the queue."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import llmos
from llmos.errors import InvalidRequestError, LLMOSError
from llmos.kernel.ipc import MailboxFull, MessageQueue, MessageTooLarge, NoSuchMessage


@pytest.fixture
def queue(tmp_path):
    q = MessageQueue(tmp_path / "ipc.db")
    yield q
    q.shutdown()


def later(delay: float, fn, *args, **kwargs) -> threading.Thread:
    """Run fn(*args) on another thread after `delay` seconds."""
    def run():
        time.sleep(delay)
        fn(*args, **kwargs)
    t = threading.Thread(target=run)
    t.start()
    return t


def test_fifo_delivery_with_sender_and_ack(queue):
    ids = [queue.send("acme", "worker", {"n": i, "text": "héllo"}, sender=7, sender_name="boss") for i in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    got = [queue.recv("acme", "worker") for _ in range(3)]
    assert [m.id for m in got] == ids
    assert [m.body for m in got] == [{"n": i, "text": "héllo"} for i in range(3)]
    m = got[0]
    assert (m.mailbox, m.sender, m.sender_name, m.topic, m.deliveries) == ("worker", 7, "boss", None, 1)
    assert abs(m.sent_at - time.time()) < 60
    assert queue.recv("acme", "worker") is None          # all three in flight: nothing visible
    assert queue.depth("acme", "worker") == 3            # in flight still counts until acked
    for m in got:
        queue.ack("acme", "worker", m.id)
    assert queue.depth("acme", "worker") == 0
    stats = queue.stats()
    assert (stats["sent"], stats["delivered"], stats["acked"], stats["redelivered"]) == (3, 3, 3, 0)
    assert (stats["depth"], stats["in_flight"]) == (0, 0)


def test_ack_rules(queue):
    msg_id = queue.send("acme", "worker", "job")
    with pytest.raises(NoSuchMessage, match=f"message {msg_id} is not in flight"):
        queue.ack("acme", "worker", msg_id)              # never received
    queue.recv("acme", "worker")
    with pytest.raises(NoSuchMessage):
        queue.ack("acme", "other", msg_id)               # wrong mailbox
    with pytest.raises(NoSuchMessage):
        queue.ack("globex", "worker", msg_id)            # wrong tenant
    queue.ack("acme", "worker", msg_id)
    with pytest.raises(NoSuchMessage):
        queue.ack("acme", "worker", msg_id)              # twice


def test_ids_are_never_reused(queue):
    first = queue.send("acme", "a", 1)
    queue.ack("acme", "a", queue.recv("acme", "a").id)
    assert queue.send("acme", "a", 2) > first            # the newest row was deleted, its id stays taken


def test_tenants_and_mailboxes_are_separate(queue):
    queue.send("acme", "worker", "for acme")
    queue.send("globex", "worker", "for globex")
    assert queue.recv("globex", "worker").body == "for globex"
    assert queue.recv("globex", "worker") is None
    assert queue.recv("acme", "other") is None
    assert queue.recv("acme", "worker").body == "for acme"
    assert queue.depths() == {("acme", "worker"): 1, ("globex", "worker"): 1}


def test_unacked_message_comes_back_after_visibility_timeout(tmp_path):
    q = MessageQueue(tmp_path / "ipc.db", visibility_timeout=0.2)
    first = q.send("acme", "worker", "a")
    q.send("acme", "worker", "b")
    assert q.recv("acme", "worker").id == first
    assert q.recv("acme", "worker").body == "b"
    assert q.recv("acme", "worker") is None
    again = q.recv("acme", "worker", timeout=10)         # sleeps until the first deadline passes
    assert (again.id, again.deliveries) == (first, 2)
    q.ack("acme", "worker", first)                       # the redelivery can be acked
    assert q.stats()["redelivered"] == 1
    q.shutdown()


def test_release_makes_in_flight_messages_visible_at_once(queue):
    ids = [queue.send("acme", "worker", i) for i in range(3)]
    queue.recv("acme", "worker")
    queue.recv("acme", "worker")
    assert queue.release("acme", "worker") == 2
    got = [queue.recv("acme", "worker") for _ in range(3)]
    assert [m.id for m in got] == ids                    # still oldest first
    assert [m.deliveries for m in got] == [2, 2, 1]


def test_body_must_be_json_and_within_the_size_limit(tmp_path):
    q = MessageQueue(tmp_path / "ipc.db", max_body_bytes=100)
    for bad in (object(), {"x": {1, 2}}, math.nan):
        with pytest.raises(InvalidRequestError, match="^body: must be JSON-serialisable"):
            q.send("acme", "worker", bad)
    with pytest.raises(MessageTooLarge, match=r"^body: 203 bytes .* limit of 100") as e:
        q.send("acme", "worker", "x" * 201)
    assert isinstance(e.value, InvalidRequestError)
    with pytest.raises(MessageTooLarge):
        q.publish("acme", "news", ["é" * 30])            # 6 bytes each as JSON escapes
    with pytest.raises(InvalidRequestError, match="^mailbox: "):
        q.send("acme", "", "hi")
    assert q.depth("acme", "worker") == 0
    assert q.send("acme", "worker", ["é" * 10, None, True, 1.5]) > 0
    assert q.recv("acme", "worker").body == ["é" * 10, None, True, 1.5]
    q.shutdown()


def test_full_mailbox_refuses_or_blocks_until_an_ack(tmp_path):
    q = MessageQueue(tmp_path / "ipc.db", max_depth=2)
    q.send("acme", "worker", 1)
    q.send("acme", "worker", 2)
    with pytest.raises(MailboxFull, match="acme/worker is full: 2 unacked messages, bound 2"):
        q.send("acme", "worker", 3)
    held = q.recv("acme", "worker")                      # in flight still takes room
    with pytest.raises(MailboxFull):
        q.send("acme", "worker", 3, block=0.1)
    t = later(0.2, q.ack, "acme", "worker", held.id)
    start = time.monotonic()
    q.send("acme", "worker", 3, block=30)                # wakes on the ack, long before 30 s
    assert time.monotonic() - start < 10
    t.join()
    assert [q.recv("acme", "worker").body for _ in range(2)] == [2, 3]
    q.shutdown()


def test_blocking_recv_wakes_on_send_and_times_out(queue):
    start = time.monotonic()
    assert queue.recv("acme", "worker", timeout=0.15) is None
    assert time.monotonic() - start >= 0.15
    t = later(0.1, queue.send, "acme", "worker", "wake up")
    start = time.monotonic()
    assert queue.recv("acme", "worker", timeout=30).body == "wake up"
    assert time.monotonic() - start < 10
    t.join()
    t = later(0.1, queue.send, "acme", "worker", "forever")
    assert queue.recv("acme", "worker", timeout=None).body == "forever"
    t.join()


def test_concurrent_senders_and_receivers_lose_and_duplicate_nothing(tmp_path):
    q = MessageQueue(tmp_path / "ipc.db", max_depth=50)
    received, lock = [], threading.Lock()

    def produce(p):
        for i in range(150):
            q.send("acme", "jobs", [p, i], sender=p, block=30)

    def consume():
        while (m := q.recv("acme", "jobs", timeout=None)).body != "stop":
            q.ack("acme", "jobs", m.id)
            with lock:
                received.append(tuple(m.body))
        q.ack("acme", "jobs", m.id)

    producers = [threading.Thread(target=produce, args=(p,)) for p in range(4)]
    consumers = [threading.Thread(target=consume) for _ in range(3)]
    for t in producers + consumers:
        t.start()
    for t in producers:
        t.join()
    for _ in consumers:
        q.send("acme", "jobs", "stop", block=30)
    for t in consumers:
        t.join()
    assert sorted(received) == [(p, i) for p in range(4) for i in range(150)]
    assert q.depth("acme", "jobs") == 0 and q.stats()["redelivered"] == 0
    q.shutdown()


def test_topics_deliver_one_copy_per_subscriber_and_dead_letter_full_ones(tmp_path):
    q = MessageQueue(tmp_path / "ipc.db", max_depth=1)
    for box in ("b", "a", "c"):
        q.subscribe("acme", "news", box)
    q.subscribe("acme", "news", "a")                     # twice is once
    q.subscribe("globex", "news", "z")
    assert q.subscribers("acme", "news") == ["a", "b", "c"]
    q.send("acme", "c", "c is busy")                     # c is now full
    assert q.publish("acme", "news", {"headline": "hi"}, sender=3, sender_name="press") == 2
    for box in ("a", "b"):
        m = q.recv("acme", box)
        assert (m.body, m.topic, m.sender, m.sender_name) == ({"headline": "hi"}, "news", 3, "press")
    assert q.recv("acme", "c").body == "c is busy"
    [dead] = q.dead_letters("acme")
    assert (dead.mailbox, dead.topic, dead.body, dead.reason) == ("c", "news", {"headline": "hi"}, "mailbox_full")
    assert q.dead_letters("globex") == [] and q.stats()["dead_lettered"] == 1
    q.unsubscribe("acme", "news", "b")
    assert q.subscribers("acme", "news") == ["a", "c"]
    assert q.publish("acme", "nobody-listens", "x") == 0
    q.shutdown()


def test_closed_mailbox_dead_letters_after_ttl_unless_reopened(tmp_path):
    q = MessageQueue(tmp_path / "ipc.db", dead_letter_ttl=100)
    q.open("acme", "gone")
    q.open("acme", "back")
    q.open("acme", "alive")
    for box in ("gone", "back", "alive", "never-opened"):
        q.send("acme", box, f"to {box}")
    held = q.recv("acme", "gone")
    q.close("acme", "gone")
    q.close("acme", "back")
    now = time.time()
    assert q.recv("acme", "gone").id == held.id          # what the dead process held is visible again
    assert q.sweep(now + 50) == 0                        # not waited long enough
    q.open("acme", "back")                               # a restarted process of the same name
    assert q.sweep(now + 101) == 1
    [dead] = q.dead_letters()
    assert (dead.mailbox, dead.body, dead.reason, dead.deliveries) == ("gone", "to gone", "ttl", 2)
    assert dead.dead_at == now + 101
    assert q.depths() == {("acme", "gone"): 0, ("acme", "back"): 1, ("acme", "alive"): 1,
                          ("acme", "never-opened"): 1}
    assert q.stats()["dead_letters"] == 1
    q.close("acme", "back")
    q.send("acme", "back", "sent after the close")
    assert q.sweep(time.time() + 99) == 0                # the clock starts at the later send
    assert q.sweep(time.time() + 101) == 2
    assert sorted(d.body for d in q.dead_letters(limit=2)) == ["sent after the close", "to back"]
    q.shutdown()


def test_a_second_kernel_cannot_open_a_queue_in_use(tmp_path, queue):
    path = tmp_path / "ipc.db"
    with pytest.raises(LLMOSError, match="held by another running kernel"):
        MessageQueue(path)


def test_nothing_is_lost_when_the_kernel_is_killed(tmp_path):
    path = tmp_path / "ipc.db"
    child = """
import os, signal, sys
from llmos.kernel.ipc import MessageQueue
q = MessageQueue(sys.argv[1])
q.subscribe("acme", "news", "reader")
for i in range(50):
    q.send("acme", "worker", {"n": i}, sender=7, sender_name="boss")
print(q.recv("acme", "worker").id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(llmos.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    in_flight = int(proc.stdout)
    q = MessageQueue(path)                               # visibility_timeout 30 s: no waiting for it
    assert q.depth("acme", "worker") == 50
    assert q.subscribers("acme", "news") == ["reader"]
    got = [q.recv("acme", "worker") for _ in range(50)]
    assert got[0].id == in_flight and got[0].deliveries == 2
    assert [m.body["n"] for m in got] == list(range(50))
    assert all(m.deliveries == 1 and m.sender_name == "boss" for m in got[1:])
    q.shutdown()


def test_orderly_restart_keeps_messages_subscriptions_and_ids(tmp_path):
    q = MessageQueue(tmp_path / "ipc.db")
    q.subscribe("acme", "news", "reader")
    q.open("acme", "reader")
    last = q.send("acme", "reader", "before")
    q.ack("acme", "reader", q.recv("acme", "reader").id)
    q.send("acme", "reader", "kept")
    q.shutdown()
    q = MessageQueue(tmp_path / "ipc.db")
    assert q.publish("acme", "news", "after") == 1
    assert [m.body for m in (q.recv("acme", "reader"), q.recv("acme", "reader"))] == ["kept", "after"]
    assert q.send("acme", "reader", "new") > last + 2
    q.shutdown()
