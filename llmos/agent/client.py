"""The agent's connection to its kernel: one system call is one HTTP request to /v1/sys,
authenticated by the token the supervisor put in the environment. Calls are numbered from
0 in the order the process makes them; the kernel replays a durable process's journal by
those numbers, so a call keeps its number when it is sent again."""

from __future__ import annotations

import json
import os
import socket
import threading
import time


class AgentError(Exception):
    """Base of every error a system call raises in an agent."""


class PermissionDenied(AgentError):
    """The process lacks the capability the call needs (`capability` names it)."""

    def __init__(self, message: str, capability: str | None = None) -> None:
        super().__init__(message)
        self.capability = capability


class LimitExceeded(AgentError):
    """The call would take the process past one of its limits, or a child past its
    parent's (`limit` names it, e.g. max_tokens)."""

    def __init__(self, message: str, limit: str | None = None) -> None:
        super().__init__(message)
        self.limit = limit


class MailboxFull(AgentError):
    """The receiver's mailbox is at its bound."""


class DeadlockError(AgentError):
    """The wait would close a cycle of processes waiting on each other."""


class MessageTooLarge(AgentError):
    """The message body (or a file, or a prompt) is over the kernel's size limit."""


class NotFound(AgentError, LookupError):
    """No such process, message or file."""


class InvalidArgument(AgentError, ValueError):
    """The call's arguments are malformed (the message names the field)."""


class AuthError(AgentError):
    """The kernel does not know this process's token (it was not started by this kernel,
    or that run of it has ended)."""


class ToolFailed(AgentError):
    """A tool call ran and failed: the tool raised, hit a limit or timed out (`code` says
    which: tool_error, tool_limit, tool_timeout)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class ApprovalDenied(AgentError):
    """A tool call that needed a person's approval was denied, or no one decided before
    its deadline: the structured refusal (`approval_id`, and the reason in the message)."""

    def __init__(self, message: str, approval_id: str | None = None) -> None:
        super().__init__(message)
        self.approval_id = approval_id


class KernelError(AgentError):
    """The kernel failed the call or could not be reached."""


_BY_STATUS = {400: InvalidArgument, 422: InvalidArgument, 401: AuthError, 404: NotFound, 413: MessageTooLarge}
_BY_CODE = {"mailbox_full": MailboxFull, "deadlock": DeadlockError}
RETRY_SECONDS = 30.0     # how long to keep trying while the kernel is unreachable (restarting)


def error_from_reply(status: int, body) -> AgentError:
    """The exception for a failed call, from its status and OpenAI-style error body."""
    err = body.get("error") if isinstance(body, dict) else None
    err = err if isinstance(err, dict) else {}
    message, code, param = err.get("message") or f"HTTP {status}", err.get("code"), err.get("param")
    if code == "permission_denied":
        return PermissionDenied(message, param)
    if code == "limit_exceeded":
        return LimitExceeded(message, param)
    if code in ("tool_error", "tool_limit", "tool_timeout"):
        return ToolFailed(message, code)
    if code == "approval_denied":
        return ApprovalDenied(message, param)
    if code in _BY_CODE:
        return _BY_CODE[code](message)
    return _BY_STATUS.get(status, KernelError)(message)


class Connection:
    """This process's line to its kernel (a Unix socket per thread, or a keep-alive HTTP
    pool) and its call counter; safe to share between threads."""

    def __init__(self, url: str, token: str, socket_path: str | None = None) -> None:
        self.url = url.rstrip("/")
        # The kernel's Unix socket, when it gave one: one line of JSON per call, about ten
        # times cheaper than an HTTP request; HTTP otherwise.
        self.socket = socket_path
        self._token = token
        self._local = threading.local()
        self._seq = 0
        self._lock = threading.Lock()
        # Failures where the kernel is down or restarting. A call cut off after the kernel got
        # it is sent again with the same number, so a durable process's journal answers it once.
        self._unreachable: tuple = (ConnectionError, FileNotFoundError)
        self._http = None
        if socket_path is None:
            import httpx   # only for HTTP: importing it is a third of an agent's start-up
            # No read timeout: an LLM call may queue behind other tenants' work for as long as
            # the scheduler decides, and waits are capped by the kernel (20 s a call).
            self._http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"},
                                      timeout=httpx.Timeout(None, connect=5.0),
                                      limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
            self._unreachable += (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout)

    @classmethod
    def from_env(cls) -> Connection:
        url, token = os.environ.get("LLMOS_URL"), os.environ.get("LLMOS_TOKEN")
        if not url or not token:
            raise AgentError("not running under llmos: LLMOS_URL and LLMOS_TOKEN are unset "
                             "(start the program with `llmos run`)")
        return cls(url, token, os.environ.get("LLMOS_SOCKET") or None)

    def call(self, call: str, **args):
        """The result of one system call, or the AgentError it failed with."""
        with self._lock:
            seq = self._seq
            self._seq += 1
        body = {"call": call, "args": args, "seq": seq}
        deadline = time.monotonic() + RETRY_SECONDS
        delay = 0.05
        while True:
            try:
                status, payload, raw = self._send(body)
                break
            except self._unreachable as e:
                self._drop_socket()
                if time.monotonic() + delay > deadline:
                    raise KernelError(f"{call}: the kernel at {self.socket or self.url} cannot be reached: {e}") \
                        from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        if status != 200:
            raise error_from_reply(status, payload)
        if not isinstance(payload, dict) or "result" not in payload:
            raise KernelError(f"{call}: malformed reply from the kernel: {raw[:200]!r}")
        return payload["result"]

    def _send(self, body: dict) -> tuple[int, object, str]:
        if self.socket is None:
            r = self._http.post("/v1/sys", json=body)
            try:
                return r.status_code, r.json(), r.text
            except ValueError:
                return r.status_code, None, r.text
        f = self._socket_file()
        f.write(json.dumps(body).encode() + b"\n")
        f.flush()
        line = f.readline()
        if not line:
            raise ConnectionResetError("the kernel closed the connection")
        payload = json.loads(line)
        return payload.get("status", 200), payload, line.decode(errors="replace")

    def _socket_file(self):
        """This thread's connection to the kernel's socket, opened (and authenticated) on first use."""
        f = getattr(self._local, "file", None)
        if f is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.socket)
            f = sock.makefile("rwb")
            f.write(json.dumps({"token": self._token}).encode() + b"\n")
            f.flush()
            hello = json.loads(f.readline() or b"null")
            if not isinstance(hello, dict) or "pid" not in hello:
                f.close()
                raise error_from_reply(401, hello)
            self._local.file = f
        return f

    def _drop_socket(self) -> None:
        f = getattr(self._local, "file", None)
        if f is not None:
            self._local.file = None
            try:
                f.close()
            except OSError:
                pass

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        self._drop_socket()
