"""Conversations longer than the context window: what MemGPT calls virtual context, run as
virtual memory is. A conversation keeps a working set of recent turns within a token
budget; when the budget is crossed, the oldest turns are paged out to semantic memory (each
user/assistant exchange one memory) and folded into a short running summary; and before
each new turn the old exchanges most relevant to it are recalled and placed beside it.

The prompt is laid out so that the KV prefix cache keeps hitting: the system message (with
the summary) and the working turns come first and change only when turns are paged out;
what changes every turn (the recalled exchanges and the new message) comes last. Paging
out frees down to half the budget at once rather than one turn at a time, so evictions,
and the cache misses they cost, are rare rather than every turn.

The state (turns, summary, what is paged out) is in SQLite, so a conversation continues
after a restart. The model call comes in as a function: the kernel does not run models.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmos.errors import InvalidRequestError

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
MAX_MESSAGE = 32_000          # characters of one message
RECALL_K = 5
OVERHEAD = 8                  # tokens a chat template may wrap around one message (role markers)


@dataclass
class Turn:
    idx: int
    role: str
    content: str
    tokens: int
    paged: bool = False


@dataclass
class Conversation:
    tenant: str
    name: str
    system: str
    budget: int
    summary: str = ""
    turns: list[Turn] = field(default_factory=list)

    @property
    def working(self) -> list[Turn]:
        return [t for t in self.turns if not t.paged]

    def to_dict(self) -> dict:
        return {"name": self.name, "system": self.system, "budget": self.budget, "summary": self.summary,
                "turns": len(self.turns), "paged_out": sum(t.paged for t in self.turns),
                "working": [asdict(t) for t in self.working]}


@dataclass
class Context:
    """The messages one turn sends to the model, and how they were assembled."""
    messages: list[dict]
    tokens: int
    recalled: list[str]
    paged_out: int                 # turns paged out while assembling this context


_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (tenant TEXT NOT NULL, name TEXT NOT NULL, system TEXT NOT NULL,
    budget INTEGER NOT NULL, summary TEXT NOT NULL DEFAULT '', created REAL NOT NULL, PRIMARY KEY (tenant, name));
CREATE TABLE IF NOT EXISTS turns (tenant TEXT NOT NULL, name TEXT NOT NULL, idx INTEGER NOT NULL, role TEXT NOT NULL,
    content TEXT NOT NULL, tokens INTEGER NOT NULL, paged INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (tenant, name, idx));
"""


class ConversationStore:
    def __init__(self, path: Path, memory, count_tokens: Callable[[str], int], *, budget: int = 1024,
                 summary_share: float = 0.125, recall_share: float = 0.25) -> None:
        self.memory = memory
        self.count_tokens = count_tokens
        self.budget = budget
        self.summary_share, self.recall_share = summary_share, recall_share
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._busy: dict[tuple[str, str], threading.Lock] = {}

    # -- the durable state ------------------------------------------------------------------
    def create(self, tenant: str, name: str, system: str = "You are a helpful assistant.",
               budget: int | None = None) -> Conversation:
        _check_name(name)
        budget = self.budget if budget is None else budget
        if isinstance(budget, bool) or not isinstance(budget, int) or not 128 <= budget <= 1 << 20:
            raise InvalidRequestError(f"budget: must be an integer of at least 128 tokens, got {budget!r}")
        if not isinstance(system, str) or len(system) > MAX_MESSAGE:
            raise InvalidRequestError(f"system: must be a string of at most {MAX_MESSAGE} characters")
        if self.count_tokens(system) > budget // 4:
            raise InvalidRequestError(f"system: longer than a quarter of the {budget}-token budget")
        with self._lock:
            if self._find(tenant, name) is not None:
                raise InvalidRequestError(f"name: a conversation named {name!r} exists already")
            self._db.execute("INSERT INTO conversations VALUES (?,?,?,?,?,?)",
                             (tenant, name, system, budget, "", time.time()))
        return self.get(tenant, name)

    def _find(self, tenant: str, name: str) -> Conversation | None:
        row = self._db.execute("SELECT system, budget, summary FROM conversations WHERE tenant=? AND name=?",
                               (tenant, name)).fetchone()
        if row is None:
            return None
        turns = [Turn(i, r, c, n, bool(p)) for i, r, c, n, p in self._db.execute(
            "SELECT idx, role, content, tokens, paged FROM turns WHERE tenant=? AND name=? ORDER BY idx",
            (tenant, name))]
        return Conversation(tenant, name, row[0], row[1], row[2], turns)

    def get(self, tenant: str, name) -> Conversation:
        _check_name(name)
        with self._lock:
            conv = self._find(tenant, name)
        if conv is None:
            raise InvalidRequestError(f"name: no conversation named {name!r}")
        return conv

    def list(self, tenant: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT name FROM conversations WHERE tenant=? ORDER BY name",
                                                   (tenant,))]

    def delete(self, tenant: str, name: str) -> bool:
        _check_name(name)
        with self._lock:
            self._db.execute("DELETE FROM turns WHERE tenant=? AND name=?", (tenant, name))
            return self._db.execute("DELETE FROM conversations WHERE tenant=? AND name=?",
                                    (tenant, name)).rowcount == 1

    def _append(self, conv: Conversation, role: str, content: str) -> Turn:
        turn = Turn(len(conv.turns), role, content, self.count_tokens(content))
        with self._lock:
            self._db.execute("INSERT INTO turns VALUES (?,?,?,?,?,?,0)",
                             (conv.tenant, conv.name, turn.idx, role, content, turn.tokens))
        conv.turns.append(turn)
        return turn

    # -- one turn -----------------------------------------------------------------------------
    def send(self, tenant: str, name, content, *, generate: Callable[[list[dict], dict], dict],
             sampling: dict | None = None, budget: int | None = None) -> dict:
        """Add a user message, run the model on the assembled context, keep its answer.
        A conversation that does not exist yet is created (with `budget`)."""
        _check_name(name)
        if not isinstance(content, str) or not content or len(content) > MAX_MESSAGE:
            raise InvalidRequestError(f"content: must be a non-empty string of at most {MAX_MESSAGE} characters")
        with self._lock:
            busy = self._busy.setdefault((tenant, name), threading.Lock())
        with busy:                       # one turn at a time per conversation: turns are ordered
            with self._lock:
                conv = self._find(tenant, name)
            if conv is None:
                conv = self.create(tenant, name, budget=budget)
            ctx = self.assemble(conv, content)
            out = generate(ctx.messages, {"max_tokens": max(16, conv.budget // 8), **(sampling or {})})
            self._append(conv, "user", content)
            self._append(conv, "assistant", out["text"])
        return {"text": out["text"], "finish_reason": out.get("finish_reason"), "context_tokens": ctx.tokens,
                "prompt_tokens": out.get("prompt_tokens"), "output_tokens": out.get("output_tokens"),
                "recalled": ctx.recalled, "paged_out": ctx.paged_out, "turns": len(conv.turns)}

    def assemble(self, conv: Conversation, content: str) -> Context:
        """The context for the next turn: pages out old turns if the working set would not
        fit, then recalls what is relevant to `content` from what was paged out."""
        new_tokens = self.count_tokens(content)
        recall_room = int(conv.budget * self.recall_share)
        reply_room = max(16, conv.budget // 8)
        fixed = (self.count_tokens(conv.system) + int(conv.budget * self.summary_share) + new_tokens + reply_room
                 + 3 * OVERHEAD)       # the system message, the new message, the reply's opening
        room = conv.budget - fixed - recall_room
        if room < 0:
            raise InvalidRequestError(f"content: {new_tokens} tokens leave no room in the {conv.budget}-token budget")
        paged = 0
        if sum(t.tokens + OVERHEAD for t in conv.working) > room:
            paged = self._page_out(conv, room // 2)
        recalled = self._recall(conv, content, recall_room)
        messages = [{"role": "system", "content": self._system_text(conv)}]
        messages += [{"role": t.role, "content": t.content} for t in conv.working]
        final = content if not recalled else (
            "Relevant earlier conversation:\n" + "\n".join(f"- {r}" for r in recalled) + f"\n\n{content}")
        messages.append({"role": "user", "content": final})
        tokens = sum(self.count_tokens(m["content"]) + OVERHEAD for m in messages)
        return Context(messages, tokens, recalled, paged)

    def _system_text(self, conv: Conversation) -> str:
        if not conv.summary:
            return conv.system
        return f"{conv.system}\n\nSummary of the earlier conversation: {conv.summary}"

    def _page_out(self, conv: Conversation, keep: int) -> int:
        """Move the oldest working turns to memory until at most `keep` tokens remain,
        whole exchanges at a time; returns how many turns left."""
        working = conv.working
        out: list[Turn] = []
        left = sum(t.tokens + OVERHEAD for t in working)
        while working and (left > keep or working[0].role != "user"):
            t = working.pop(0)
            out.append(t)
            left -= t.tokens + OVERHEAD
        exchanges = _exchanges(out)
        if exchanges:
            self.memory.remember_many(conv.tenant, _scope(conv), exchanges,
                                      [{"conversation": conv.name, "turn": t.idx} for t in out if t.role == "user"]
                                      or None)
        conv.summary = self._summarize(conv.summary, out, int(conv.budget * self.summary_share))
        with self._lock:
            self._db.executemany("UPDATE turns SET paged=1 WHERE tenant=? AND name=? AND idx=?",
                                 [(conv.tenant, conv.name, t.idx) for t in out])
            self._db.execute("UPDATE conversations SET summary=? WHERE tenant=? AND name=?",
                             (conv.summary, conv.tenant, conv.name))
        for t in out:
            t.paged = True
        return len(out)

    def _summarize(self, summary: str, turns: list[Turn], limit: int) -> str:
        """An extractive running summary: the first sentence of each paged-out user turn,
        newest kept when it grows past `limit` tokens. Extractive because it costs no model
        time and cannot invent facts; the full text stays recallable in memory."""
        notes = [_first_sentence(t.content) for t in turns if t.role == "user"]
        text = " ".join(x for x in [summary, *notes] if x)
        while text and self.count_tokens(text) > limit:
            cut = text.find(" ", len(text) // 4)
            text = text[cut + 1:] if cut > 0 else ""
        return text

    def _recall(self, conv: Conversation, content: str, room: int) -> list[str]:
        """The paged-out exchanges most relevant to `content` that fit in `room` tokens.
        An exchange said twice (a question asked again, answered the same) is recalled
        once: repeats would crowd out what they are about."""
        if not any(t.paged for t in conv.turns):
            return []
        found = self.memory.recall(conv.tenant, [_scope(conv)], content, 2 * RECALL_K, {"conversation": conv.name})
        out, used = [], 0
        for m in found:
            n = self.count_tokens(m.text) + 2     # "- " and the line break
            if m.text in out or used + n > room:
                continue
            out.append(m.text)
            used += n
            if len(out) == RECALL_K:
                break
        return out


def _scope(conv: Conversation) -> str:
    return f"conv:{conv.name}"


def _exchanges(turns: list[Turn]) -> list[str]:
    """Paged-out turns as memories: one per user message with the answer that followed."""
    out: list[str] = []
    for t in turns:
        if t.role == "user":
            out.append(f"user: {t.content}")
        elif out:
            out[-1] += f"\nassistant: {t.content}"
    return out


def _first_sentence(text: str) -> str:
    m = re.match(r"(.{1,200}?[.!?])(\s|$)", text.strip(), re.S)
    return (m.group(1) if m else text.strip()[:200]).replace("\n", " ")


def _check_name(name) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequestError(f"name: must be 1-128 letters, digits, '_', '.' or '-', got {name!r}")
