"""The agent's connection to its kernel: one system call is one HTTP request to /v1/sys,
authenticated by the token the supervisor put in the environment. Calls are numbered from
0 in the order the process makes them; the kernel replays a durable process's journal by
those numbers."""

from __future__ import annotations

import os
import threading
import time

import httpx


class AgentError(Exception):
    """Base of every error a system call raises in an agent."""


class PermissionDenied(AgentError):
    """The process lacks the capability the call needs (`capability` names it)."""

    def __init__(self, message: str, capability: str | None = None) -> None:
        super().__init__(message)
        self.capability = capability


class MailboxFull(AgentError):
    """The receiver's mailbox is at its bound."""


class DeadlockError(AgentError):
    """The wait would close a cycle of processes waiting on each other."""


class MessageTooLarge(AgentError):
    """The message body is over the kernel's size limit."""


class NotFound(AgentError, LookupError):
    """No such process, message or file."""


class InvalidArgument(AgentError, ValueError):
    """The call's arguments are malformed (the message names the field)."""


class AuthError(AgentError):
    """The kernel does not know this process's token (it was not started by this kernel)."""


class KernelError(AgentError):
    """The kernel failed the call or could not be reached."""


_BY_CODE = {"mailbox_full": MailboxFull, "deadlock": DeadlockError, "message_too_large": MessageTooLarge}
_BY_STATUS = {401: AuthError, 404: NotFound, 400: InvalidArgument, 422: InvalidArgument, 413: MessageTooLarge,
              409: KernelError, 429: MailboxFull}
RETRY_SECONDS = 30.0     # how long to keep trying while the kernel is unreachable (restarting)


def _error(status: int, body: dict) -> AgentError:
    err = body.get("error", {}) if isinstance(body, dict) else {}
    message, code = err.get("message") or f"HTTP {status}", err.get("code")
    if status == 403:
        return PermissionDenied(message, err.get("param")) if code == "permission_denied" else AgentError(message)
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status, KernelError)
    return cls(message)


class Connection:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url.rstrip("/"), token
        self._seq = 0
        self._lock = threading.Lock()
        self._http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"},
                                  timeout=httpx.Timeout(60.0, connect=5.0),
                                  limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))

    @classmethod
    def from_env(cls) -> Connection:
        url, token = os.environ.get("LLMOS_URL"), os.environ.get("LLMOS_TOKEN")
        if not url or not token:
            raise AgentError("not running under llmos: LLMOS_URL and LLMOS_TOKEN are unset "
                             "(start the program with `llmos run`)")
        return cls(url, token)

    def call(self, call: str, **args):
        with self._lock:
            seq = self._seq
            self._seq += 1
        body = {"call": call, "args": args, "seq": seq}
        deadline = time.monotonic() + RETRY_SECONDS
        delay = 0.05
        while True:
            try:
                r = self._http.post("/v1/sys", json=body)
                break
            except (httpx.ConnectError, httpx.RemoteProtocolError) as e:
                if time.monotonic() > deadline:
                    raise KernelError(f"{call}: the kernel at {self.url} cannot be reached: {e}") from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        if r.status_code != 200:
            try:
                payload = r.json()
            except ValueError:
                payload = {}
            raise _error(r.status_code, payload)
        return r.json()["result"]
