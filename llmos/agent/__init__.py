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

from llmos.agent.client import (AgentError, AuthError, Connection, DeadlockError, InvalidArgument, KernelError,
                                LimitExceeded, MailboxFull, MessageTooLarge, NotFound, PermissionDenied)

__all__ = ["pid", "name", "tenant", "chat", "generate", "embed", "send", "recv", "ack", "publish", "subscribe",
           "unsubscribe", "spawn", "wait", "kill", "suspend", "resume", "renice", "ps", "self", "exit", "fs",
           "Message", "AgentError", "PermissionDenied", "LimitExceeded", "MailboxFull", "DeadlockError",
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
def chat(messages: str | list[dict], **sampling) -> str:
    """The model's reply to a conversation (or to one user message given as a string)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return _call("llm.chat", messages=messages, sampling=sampling)["text"]


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
_LIMITS = ("max_tokens", "kv_quota", "max_wall", "max_memory", "max_cpu", "max_children")


def spawn(path: str, name: str | None = None, caps: list[str] | None = None, args=(), priority: int | None = None,
          weight: float | None = None, restart: str = "never", durable: bool = False, **limits) -> int:
    """Start a child process; returns its pid. A relative path is resolved against the
    directory of this program's own file (so an agent finds its siblings wherever it was
    started from); "module:function" is passed as it is. The child's capabilities and
    limits (max_tokens, kv_quota, max_wall, max_memory, max_cpu, max_children) may only
    narrow this process's; caps=None means all of this process's."""
    from llmos.agent.run import resolve_program   # not at import: run.py is __main__ in an agent process
    unknown = sorted(set(limits) - set(_LIMITS))
    if unknown:
        raise TypeError(f"spawn() got an unexpected keyword argument {unknown[0]!r} (limits: {', '.join(_LIMITS)})")
    if isinstance(args, (str, bytes)):
        raise TypeError("spawn(): args must be a list of arguments, not one string")
    here = os.environ.get("LLMOS_AGENT_FILE")
    body = {"path": resolve_program(path, os.path.dirname(here) if here else os.getcwd()), "name": name,
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


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else bytes(data)).decode()


fs = _Files()
