"""Durable message queues between agents: a mailbox per process, and named topics.

Messages live in one SQLite file (WAL, synchronous=NORMAL: every write is committed before
the call returns and survives the kernel process being killed). Delivery is at-least-once:
`recv` hands out the oldest visible message and hides it for `visibility_timeout` seconds;
`ack` deletes it. A message not acked in time, held by a receiver that died (`release`,
`close`) or by a kernel that restarted is visible again and handed out once more with
`deliveries` counting up, so a receiver can tell a redelivery from a first delivery.

Nothing disappears silently. A mailbox holds at most `max_depth` unacked messages: a sender
gets MailboxFull, or waits for room. A published copy that finds its subscriber's mailbox
full is dead-lettered (reason "mailbox_full") instead of blocking the publisher on its
slowest subscriber. Messages left in a mailbox whose process exited (`close`) move to the
dead letters (reason "ttl") in `sweep` once they have waited `dead_letter_ttl` seconds,
unless a process of the same name opens the mailbox again first. A mailbox never opened is
never swept: its process may not have started yet. Publishing to a topic nobody subscribes
to delivers nothing and stores nothing, as in any publish-subscribe system.

Blocking waits on one Condition per mailbox over the instance's single lock: a send wakes
that mailbox's receivers, an ack or sweep its waiting senders, and a receiver whose only
messages are in flight sleeps until the earliest of their visibility deadlines.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from llmos.errors import InvalidRequestError, LLMOSError

# visible_at is 0 while a message waits to be handed out, else the time its receiver's hold ends.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, mailbox TEXT NOT NULL,
    sender INTEGER, sender_name TEXT, topic TEXT, body TEXT NOT NULL, sent_at REAL NOT NULL,
    visible_at REAL NOT NULL DEFAULT 0, deliveries INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS messages_queue ON messages (tenant, mailbox, visible_at, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY, id INTEGER NOT NULL, tenant TEXT NOT NULL, mailbox TEXT NOT NULL,
    sender INTEGER, sender_name TEXT, topic TEXT, body TEXT NOT NULL, sent_at REAL NOT NULL,
    deliveries INTEGER NOT NULL, reason TEXT NOT NULL, dead_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS dead_letters_tenant ON dead_letters (tenant, seq);
CREATE TABLE IF NOT EXISTS mailboxes (
    tenant TEXT NOT NULL, mailbox TEXT NOT NULL, closed_at REAL,
    PRIMARY KEY (tenant, mailbox)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscriptions (
    tenant TEXT NOT NULL, topic TEXT NOT NULL, mailbox TEXT NOT NULL,
    PRIMARY KEY (tenant, topic, mailbox)) WITHOUT ROWID;
"""
_COLUMNS = "id, mailbox, sender, sender_name, topic, body, sent_at, deliveries"


class MailboxFull(LLMOSError):
    """A mailbox holds its bound of unacked messages; retry once its receiver catches up."""


class MessageTooLarge(InvalidRequestError):
    """A message body is over the queue's size limit."""


class NoSuchMessage(LLMOSError):
    """An ack named a message that is not in flight in that mailbox (never received,
    already acked, or released for redelivery after its receiver died)."""


@dataclass
class Message:
    id: int
    mailbox: str
    sender: int | None        # pid of the sending process; None for the kernel or a user
    sender_name: str | None
    topic: str | None         # set when the message is a published copy
    body: Any
    sent_at: float
    deliveries: int           # times handed out, this one included: > 1 means redelivered


@dataclass
class DeadLetter(Message):
    reason: str               # "ttl" (owner gone too long) or "mailbox_full" (published copy)
    dead_at: float


def _message(row: tuple, cls=Message, *extra) -> Message:
    return cls(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7], *extra)


def _name(field: str, value) -> str:
    if not isinstance(value, str) or not value or len(value) > 256:
        raise InvalidRequestError(f"{field}: must be a non-empty string of at most 256 characters, got {value!r}")
    return value


class MessageQueue:
    def __init__(self, path, *, max_depth: int = 1000, max_body_bytes: int = 65536,
                 visibility_timeout: float = 30.0, dead_letter_ttl: float = 3600.0) -> None:
        self.max_depth = max_depth
        self.max_body_bytes = max_body_bytes
        self.visibility_timeout = visibility_timeout
        self.dead_letter_ttl = dead_letter_ttl
        self.counters = dict.fromkeys(("sent", "delivered", "redelivered", "acked", "dead_lettered"), 0)
        self._lock = threading.Lock()
        self._waiters: dict[tuple[str, str], threading.Condition] = {}
        self._depths: dict[tuple[str, str], int] = {}    # unacked per mailbox: this instance owns the file
        self._db = sqlite3.connect(str(path), timeout=1.0, check_same_thread=False, isolation_level=None)
        # One kernel owns the file (the depth counts above rely on it). The exclusive lock
        # enforces that and halves the cost of a commit: no file locks or shared memory per write.
        self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as e:
            self._db.close()
            raise LLMOSError(f"message queue {path} is held by another running kernel ({e})") from None
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        # The receivers of a previous kernel are gone: what they held is visible again.
        self._db.execute("UPDATE messages SET visible_at = 0 WHERE visible_at > 0")
        self._count()

    def shutdown(self) -> None:
        """Close the file (kernel shutdown); the next MessageQueue on it picks up where this left off."""
        with self._lock:
            self._db.close()

    def _count(self) -> None:
        self._depths = {(t, m): n for t, m, n in self._db.execute(
            "SELECT tenant, mailbox, COUNT(*) FROM messages GROUP BY tenant, mailbox")}

    @contextmanager
    def _tx(self):
        self._db.execute("BEGIN")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            self._count()
            raise
        self._db.execute("COMMIT")

    def _cond(self, key: tuple[str, str]) -> threading.Condition:
        c = self._waiters.get(key)
        if c is None:
            c = self._waiters[key] = threading.Condition(self._lock)
        return c

    def _wake(self, key: tuple[str, str]) -> None:
        c = self._waiters.get(key)
        if c is not None:
            c.notify_all()

    def _encode(self, body) -> str:
        try:
            data = json.dumps(body, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(f"body: must be JSON-serialisable ({e})") from None
        if len(data) > self.max_body_bytes:     # ensure_ascii: one character is one byte
            raise MessageTooLarge(f"body: {len(data)} bytes as JSON is over the limit of {self.max_body_bytes}")
        return data

    def _insert(self, key, data: str, sender, sender_name, topic) -> int:
        msg_id = self._db.execute(
            "INSERT INTO messages (tenant, mailbox, sender, sender_name, topic, body, sent_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", (*key, sender, sender_name, topic, data, time.time())).lastrowid
        self._depths[key] = self._depths.get(key, 0) + 1
        return msg_id

    def _bury(self, where: str, params: tuple, reason: str, now: float) -> int:
        """Move the messages matching `where` to the dead letters; the caller holds a transaction."""
        rows = self._db.execute(f"DELETE FROM messages WHERE {where} RETURNING id, tenant, mailbox, sender, "
                                "sender_name, topic, body, sent_at, deliveries", params).fetchall()
        self._db.executemany("INSERT INTO dead_letters (id, tenant, mailbox, sender, sender_name, topic, body, "
                             "sent_at, deliveries, reason, dead_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             [(*r, reason, now) for r in rows])
        for r in rows:
            self._depths[r[1], r[2]] -= 1
        return len(rows)

    def send(self, tenant: str, mailbox: str, body, *, sender: int | None = None, sender_name: str | None = None,
             topic: str | None = None, block: float | None = None) -> int:
        """Store a message and return its id; with `block`, wait up to that many seconds for room."""
        key = (_name("tenant", tenant), _name("mailbox", mailbox))
        data = self._encode(body)
        with self._lock:
            deadline = time.monotonic() + (block or 0)
            while (depth := self._depths.get(key, 0)) >= self.max_depth:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MailboxFull(f"mailbox {tenant}/{mailbox} is full: {depth} unacked messages, "
                                      f"bound {self.max_depth}")
                self._cond(key).wait(left)
            msg_id = self._insert(key, data, sender, sender_name, topic)
            self.counters["sent"] += 1
            self._wake(key)
            return msg_id

    def recv(self, tenant: str, mailbox: str, timeout: float | None = 0) -> Message | None:
        """The oldest visible message, now in flight; waits up to `timeout` seconds (None: for
        ever) for one to arrive or come back; None when none did."""
        key = (tenant, mailbox)
        with self._lock:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                now = time.time()
                # The oldest message never handed out or back, or whose visibility expired.
                rows = self._db.execute(
                    "UPDATE messages SET visible_at = ?, deliveries = deliveries + 1 WHERE id = (SELECT min(id) FROM "
                    "(SELECT min(id) AS id FROM messages WHERE tenant = ? AND mailbox = ? AND visible_at = 0 UNION ALL "
                    " SELECT min(id) FROM messages WHERE tenant = ? AND mailbox = ? AND visible_at > 0 "
                    f"AND visible_at <= ?)) RETURNING {_COLUMNS}",
                    (now + self.visibility_timeout, *key, *key, now)).fetchall()
                if rows:
                    msg = _message(rows[0])
                    self.counters["delivered"] += 1
                    self.counters["redelivered"] += msg.deliveries > 1
                    return msg
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                back = self._db.execute("SELECT MIN(visible_at) FROM messages WHERE tenant = ? AND mailbox = ? "
                                        "AND visible_at > 0", key).fetchone()[0]
                if back is not None:
                    until_back = max(back - time.time(), 0.001)
                    left = until_back if left is None else min(left, until_back)
                self._cond(key).wait(left)

    def ack(self, tenant: str, mailbox: str, message_id: int) -> None:
        """The receiver is done with a message: delete it, freeing room for blocked senders."""
        key = (tenant, mailbox)
        with self._lock:
            gone = self._db.execute("DELETE FROM messages WHERE id = ? AND tenant = ? AND mailbox = ? "
                                    "AND visible_at > 0", (message_id, *key)).rowcount
            if not gone:
                raise NoSuchMessage(f"message {message_id} is not in flight in mailbox {tenant}/{mailbox}")
            self._depths[key] -= 1
            self.counters["acked"] += 1
            self._wake(key)

    def _release(self, key: tuple[str, str]) -> int:
        n = self._db.execute("UPDATE messages SET visible_at = 0 WHERE tenant = ? AND mailbox = ? AND visible_at > 0",
                             key).rowcount
        self._wake(key)
        return n

    def release(self, tenant: str, mailbox: str) -> int:
        """The receiver died: every message it held is visible again now. Returns how many."""
        with self._lock:
            return self._release((tenant, mailbox))

    def open(self, tenant: str, mailbox: str) -> None:
        """A live process holds this mailbox: its messages are never dead-lettered for age."""
        with self._lock:
            self._db.execute("INSERT INTO mailboxes VALUES (?, ?, NULL) ON CONFLICT DO UPDATE SET closed_at = NULL",
                             (_name("tenant", tenant), _name("mailbox", mailbox)))

    def close(self, tenant: str, mailbox: str) -> None:
        """The mailbox's process exited: what it held is released, and the dead-letter clock starts."""
        with self._lock, self._tx() as db:
            db.execute("INSERT INTO mailboxes VALUES (?, ?, ?) "
                       "ON CONFLICT DO UPDATE SET closed_at = excluded.closed_at", (tenant, mailbox, time.time()))
            self._release((tenant, mailbox))

    def sweep(self, now: float | None = None) -> int:
        """Dead-letter the messages that waited `dead_letter_ttl` in a closed mailbox; returns how many."""
        now = time.time() if now is None else now
        where = ("id IN (SELECT m.id FROM messages m JOIN mailboxes b USING (tenant, mailbox) "
                 "WHERE b.closed_at IS NOT NULL AND max(m.sent_at, b.closed_at) < ?)")
        with self._lock:
            with self._tx():
                n = self._bury(where, (now - self.dead_letter_ttl,), "ttl", now)
            self.counters["dead_lettered"] += n
            for c in self._waiters.values() if n else ():
                c.notify_all()
            return n

    def subscribe(self, tenant: str, topic: str, mailbox: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO subscriptions VALUES (?, ?, ?)",
                             (_name("tenant", tenant), _name("topic", topic), _name("mailbox", mailbox)))

    def unsubscribe(self, tenant: str, topic: str, mailbox: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM subscriptions WHERE tenant = ? AND topic = ? AND mailbox = ?",
                             (tenant, topic, mailbox))

    def subscribers(self, tenant: str, topic: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT mailbox FROM subscriptions WHERE tenant = ? AND topic = ? ORDER BY mailbox", (tenant, topic))]

    def publish(self, tenant: str, topic: str, body, *, sender: int | None = None,
                sender_name: str | None = None) -> int:
        """Store one copy per subscriber, all or none; returns how many were delivered (the
        copies for full mailboxes are dead-lettered instead)."""
        _name("tenant", tenant)
        _name("topic", topic)
        data = self._encode(body)
        with self._lock:
            now, delivered, buried = time.time(), 0, 0
            with self._tx() as db:
                boxes = [r[0] for r in db.execute(
                    "SELECT mailbox FROM subscriptions WHERE tenant = ? AND topic = ?", (tenant, topic))]
                for box in boxes:
                    full = self._depths.get((tenant, box), 0) >= self.max_depth
                    msg_id = self._insert((tenant, box), data, sender, sender_name, topic)
                    if full:
                        buried += self._bury("id = ?", (msg_id,), "mailbox_full", now)
                    else:
                        delivered += 1
            self.counters["sent"] += delivered
            self.counters["dead_lettered"] += buried
            for box in boxes:
                self._wake((tenant, box))
            return delivered

    def dead_letters(self, tenant: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """The most recent dead letters, newest last."""
        where, params = ("WHERE tenant = ?", (tenant,)) if tenant is not None else ("", ())
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM (SELECT seq, {_COLUMNS}, reason, dead_at FROM dead_letters {where} "
                "ORDER BY seq DESC LIMIT ?) ORDER BY seq", (*params, limit)).fetchall()
        return [_message(r[1:9], DeadLetter, r[9], r[10]) for r in rows]

    def depth(self, tenant: str, mailbox: str) -> int:
        """Unacked messages in a mailbox, in flight included."""
        with self._lock:
            return self._depths.get((tenant, mailbox), 0)

    def depths(self) -> dict[tuple[str, str], int]:
        """Depth of every mailbox that was opened or has held messages since the kernel started."""
        with self._lock:
            out = {(t, m): 0 for t, m in self._db.execute("SELECT tenant, mailbox FROM mailboxes")}
            out.update(self._depths)
            return out

    def stats(self) -> dict[str, int]:
        """Counters since this instance started, and the queue's current state from the file."""
        with self._lock:
            depth, in_flight = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(visible_at > 0), 0) FROM messages").fetchone()
            dead = self._db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
            return {**self.counters, "depth": depth, "in_flight": in_flight, "dead_letters": dead}
