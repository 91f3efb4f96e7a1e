"""The agent SDK: what a program that llmos runs as a process imports. Every function is a
system call to the kernel that started this process (its URL and this process's token
come from the environment the supervisor set); nothing here holds authority of its own.

    from llmos import agent
    text = agent.chat("Summarise: ...", max_tokens=40)
    agent.send("coordinator", {"summary": text})
"""

from __future__ import annotations

import base64
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from llmos.agent.client import (AgentError, ApprovalDenied, AuthError, Connection, DeadlockError, InvalidArgument,
                                KernelError, LimitExceeded, MailboxFull, MessageTooLarge, NotFound, PermissionDenied,
                                ToolFailed)

__all__ = ["pid", "name", "tenant", "chat", "generate", "embed", "send", "recv", "ack", "publish", "subscribe",
           "unsubscribe", "spawn", "wait", "kill", "suspend", "resume", "renice", "ps", "self", "exit", "fs",
           "tools", "call_tool", "remember", "recall", "forget", "kv", "conversation", "Message", "Memory",
           "ChatResult", "Conversation", "ToolFailed", "ApprovalDenied", "AgentError", "PermissionDenied", "LimitExceeded", "MailboxFull", "DeadlockError",
           "MessageTooLarge", "NotFound", "InvalidArgument", "AuthError", "KernelError"]

pid = int(os.environ["LLMOS_PID"]) if os.environ.get("LLMOS_PID", "").isdigit() else None
name = os.environ.get("LLMOS_NAME")
tenant = os.environ.get("LLMOS_TENANT")

_conn: Connection | None = None
_conn_lock = threading.Lock()


def _call(call: str, **args):
    """One system call on this process's connection, opened on first use."""
    global _conn
    if _conn is None:
        with _conn_lock:
            if _conn is None:
                _conn = Connection.from_env()
    return _conn.call(call, **args)


@dataclass
class Message:
    id: int
    sender: int | None          # the sending process's pid (None: a user or the kernel)
    sender_name: str | None
    topic: str | None           # set when it came through a topic
    body: Any
    sent_at: float
    deliveries: int             # > 1: delivered before and not acknowledged

    @classmethod
    def from_dict(cls, m: dict) -> Message:
        return cls(m["id"], m.get("sender"), m.get("sender_name"), m.get("topic"), m.get("body"),
                   m.get("sent_at", 0.0), m.get("deliveries", 1))


# -- llm ----------------------------------------------------------------------------------
class ChatResult(str):
    """The model's answer (a str), with what led to it when tools were offered: `trace`,
    the tool calls the kernel ran ({"name", "arguments", "result" or "error"}), and
    `tool_call`, the call the model asked for when the kernel was not to run it."""

    trace: list[dict]
    tool_call: dict | None
    turns: int

    def __new__(cls, text: str, trace=(), tool_call=None, turns: int = 1) -> ChatResult:
        obj = super().__new__(cls, text)
        obj.trace, obj.tool_call, obj.turns = list(trace), tool_call, turns
        return obj


def chat(messages: str | list[dict], tools: list[str] | None = None, execute_tools: bool = False,
         max_turns: int = 4, tool_choice: str = "auto", **sampling) -> ChatResult:
    """The model's reply to a conversation (or to one user message given as a string).
    With `tools` (names of registered tools) the model may call them: with
    `execute_tools` the kernel runs the model -> tool -> model loop (at most `max_turns`
    calls) and returns the final answer with its `trace`; without, the reply's `tool_call`
    is the call the model asked for, for this program to make. `tool_choice` is "auto",
    "required", or a tool's name to force that call first."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    body = {"messages": messages, "sampling": sampling}
    if tools is not None:
        body.update(tools=list(tools), execute_tools=execute_tools, max_turns=max_turns, tool_choice=tool_choice)
    r = _call("llm.chat", **body)
    return ChatResult(r["text"], r.get("trace", ()), r.get("tool_call"), r.get("turns", 1))


def generate(prompt: str, **sampling) -> str:
    """The model's continuation of a plain prompt."""
    return _call("llm.generate", prompt=prompt, sampling=sampling)["text"]


def embed(text: str | list[str]) -> list[float] | list[list[float]]:
    out = _call("llm.embed", input=text)["embeddings"]
    return out[0] if isinstance(text, str) else out


# -- messages -----------------------------------------------------------------------------
def send(to: int | str, body: Any, block: float | None = None) -> int:
    """Store a message in the mailbox of process `to` (a pid or a name); returns its id.
    A full mailbox raises MailboxFull, or with `block` waits up to that many seconds."""
    return _call("msg.send", to=to, body=body, block=block)["id"]


def recv(timeout: float | None = None) -> Message | None:
    """The next message for this process, waiting up to `timeout` seconds (None: for ever).
    Acknowledge it with ack() once handled, or it is delivered again."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        m = _call("msg.recv", timeout=left)["message"]
        if m is not None:
            return Message.from_dict(m)
        if deadline is not None and time.monotonic() >= deadline:
            return None


def ack(message: Message | int) -> None:
    _call("msg.ack", id=message.id if isinstance(message, Message) else message)


def publish(topic: str, body: Any) -> int:
    """A copy to every subscriber of `topic`; returns how many."""
    return _call("msg.publish", topic=topic, body=body)["delivered"]


def subscribe(topic: str) -> None:
    _call("msg.subscribe", topic=topic)


def unsubscribe(topic: str) -> None:
    _call("msg.unsubscribe", topic=topic)


# -- processes ------------------------------------------------------------------------------
_LIMITS = ("max_tokens", "kv_quota", "max_wall", "max_memory", "max_cpu", "max_children", "max_pids")


def spawn(path: str, name: str | None = None, caps: list[str] | None = None, args=(), priority: int | None = None,
          weight: float | None = None, restart: str = "never", durable: bool = False, **limits) -> int:
    """Start a child process; returns its pid. A relative path names a program beside this
    one's own file (in the tenant's storage, for a program run from there), wherever this
    process was started from; an absolute host path or "module:function" is for programs an
    admin started. The child's capabilities and limits (max_tokens, kv_quota, max_wall,
    max_memory, max_cpu, max_children, max_pids) may only narrow this process's; caps=None
    means all of this process's, and its confinement is this process's or narrower."""
    unknown = sorted(set(limits) - set(_LIMITS))
    if unknown:
        raise TypeError(f"spawn() got an unexpected keyword argument {unknown[0]!r} (limits: {', '.join(_LIMITS)})")
    if isinstance(args, (str, bytes)):
        raise TypeError("spawn(): args must be a list of arguments, not one string")
    body = {"path": os.path.expanduser(path) if path.startswith("~") else path, "name": name,
            "caps": None if caps is None else list(caps), "args": [str(a) for a in args], "restart": restart,
            "durable": durable, "limits": limits}
    if priority is not None:
        body["priority"] = priority
    if weight is not None:
        body["weight"] = weight
    return _call("proc.spawn", **body)["pid"]


def wait(pid: int, timeout: float | None = None) -> int | None:
    """The exit code of a child (or deeper descendant) once it has ended for good; None if
    `timeout` seconds passed first. A negative code: killed by that signal."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        r = _call("proc.wait", pid=pid, timeout=left)
        if r["done"]:
            return r["exit_code"]
        if deadline is not None and time.monotonic() >= deadline:
            return None


def kill(pid: int) -> bool:
    return _call("proc.kill", pid=pid)["ok"]


def suspend(pid: int) -> bool:
    return _call("proc.suspend", pid=pid)["ok"]


def resume(pid: int) -> bool:
    return _call("proc.resume", pid=pid)["ok"]


def renice(pid: int, priority: int, weight: float | None = None) -> bool:
    return _call("proc.renice", pid=pid, priority=priority, weight=weight)["ok"]


def ps(all: bool = False) -> list[dict]:
    """This tenant's live processes (with `all`, ended ones too)."""
    return _call("proc.ps", **({"all": True} if all else {}))["processes"]


def self() -> dict:
    """This process's row in the process table."""
    return _call("proc.self")


def exit(code: int = 0) -> None:
    """Tell the kernel this process is ending (the call is audited like any other), then
    end it with `code`. It ends even if the kernel cannot be told: the supervisor sees the
    exit status either way."""
    try:
        _call("proc.exit", code=code)
    except AgentError:
        pass
    sys.exit(code)


# -- files ----------------------------------------------------------------------------------
class _Files:
    """The tenant's sandboxed storage; paths are relative to its root."""

    @staticmethod
    def read(path: str) -> bytes:
        return base64.b64decode(_call("fs.read", path=path)["data"])

    @staticmethod
    def write(path: str, data: bytes | str) -> None:
        _call("fs.write", path=path, data=_b64(data))

    @staticmethod
    def append(path: str, data: bytes | str) -> None:
        _call("fs.append", path=path, data=_b64(data))

    @staticmethod
    def list(path: str = "") -> list[dict]:
        return _call("fs.list", path=path)["entries"]

    @staticmethod
    def delete(path: str) -> None:
        _call("fs.delete", path=path)

    @staticmethod
    def stat(path: str) -> dict:
        return _call("fs.stat", path=path)


# -- tools ----------------------------------------------------------------------------------
def tools() -> list[dict]:
    """The tools this process may call: name, description, JSON schema of the parameters,
    whether a person must approve each call."""
    return _call("tool.list")["tools"]


def call_tool(name: str, **args) -> Any:
    """Run a tool and return its result. Raises PermissionDenied without the tool:<name>
    capability, InvalidArgument for arguments that do not fit its schema, ToolFailed when
    it fails or times out, ApprovalDenied when a person says no (or never answers). A tool
    that needs approval blocks here, the process waiting-approval, until it is decided."""
    r = _call("tool.call", name=name, args=args)
    while "pending" in r:
        r = _call("tool.await", id=r["pending"])
    return r["result"]


# -- long-term memory -------------------------------------------------------------------------
@dataclass
class Memory:
    id: str
    text: str
    score: float
    metadata: dict
    created_at: float = 0.0
    shared: bool = False


def remember(text: str, metadata: dict | None = None, shared: bool = False) -> str:
    """Store `text` in this process's long-term memory (with `shared`, the tenant's, which
    needs mem:shared); returns its id."""
    return _call("mem.remember", text=text, metadata=metadata, shared=shared)["id"]


def recall(query: str, k: int = 5, filter: dict | None = None) -> list[Memory]:
    """The `k` memories most relevant to `query`, best first (own memory, plus the tenant's
    shared memory with mem:shared); `filter` keeps those whose metadata has these values."""
    return [Memory(**m) for m in _call("mem.recall", query=query, k=k, filter=filter)["items"]]


def forget(id: str, shared: bool = False) -> bool:
    return _call("mem.forget", id=id, shared=shared)["ok"]


class _KV:
    """The tenant's key-value store (JSON values, versioned); keys need kv:<glob>."""

    @staticmethod
    def get(key: str, default: Any = None) -> Any:
        item = _call("kv.get", key=key)["item"]
        return default if item is None else item["value"]

    @staticmethod
    def put(key: str, value: Any, if_version: int | None = None) -> int:
        """Store `value`; returns the new version. With `if_version`, only if the key is
        still at that version (0: only if absent)."""
        return _call("kv.put", key=key, value=value, if_version=if_version)["version"]

    @staticmethod
    def version(key: str) -> int:
        item = _call("kv.get", key=key)["item"]
        return 0 if item is None else item["version"]

    @staticmethod
    def delete(key: str) -> bool:
        return _call("kv.delete", key=key)["ok"]

    @staticmethod
    def list(prefix: str = "") -> list[str]:
        return _call("kv.list", prefix=prefix)["keys"]


kv = _KV()


class Conversation:
    """A conversation the kernel keeps (see llmos.kernel.conversation): it may run far
    longer than the context window; old turns are paged to memory and recalled."""

    def __init__(self, name: str, budget: int | None = None) -> None:
        self.name, self.budget = name, budget

    def send(self, content: str, **sampling) -> str:
        return _call("conv.send", name=self.name, content=content, sampling=sampling, budget=self.budget)["text"]

    def info(self) -> dict:
        return _call("conv.get", name=self.name)


def conversation(name: str, budget: int | None = None) -> Conversation:
    return Conversation(name, budget)


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else bytes(data)).decode()


fs = _Files()
