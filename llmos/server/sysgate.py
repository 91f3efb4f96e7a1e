"""The system call gate on a Unix socket: the fast path for agents on this machine.

An HTTP request through the ASGI stack costs about a millisecond here, more than most
system calls themselves (a message send is a few SQLite writes). So the supervisor also
hands each agent the path of this socket; the SDK keeps a connection open per thread and
sends one line of JSON per call, `{"call", "args", "seq"}`, after a first line with its
token. Replies are one line each: `{"result": ...}` or `{"status": N, "error": {...}}`, the
same error body and status as POST /v1/sys. The socket file is only the kernel's user's
(mode 0600), and the token still decides who the caller is.
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import threading
from pathlib import Path

from llmos.errors import LLMOSError
from llmos.kernel.agents import AgentKernel
from llmos.server.errors import APIError, bad_request, from_llmos

log = logging.getLogger("llmos.server")


class SyscallGate:
    def __init__(self, path: Path, agents: AgentKernel) -> None:
        self.path = Path(path)
        self.path.unlink(missing_ok=True)
        gate = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                gate.serve(self.rfile, self.wfile)

        self.agents = agents
        old = os.umask(0o177)
        try:
            self.server = socketserver.ThreadingUnixStreamServer(str(self.path), Handler)
        finally:
            os.umask(old)
        # Jailed agents run under uids of their own and reach the socket through a bind: any
        # uid may connect, and the token decides who the caller is. Its directory (the
        # agents directory, mode 0700) keeps the host's other users from reaching it.
        os.chmod(self.path, 0o666)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="llmos-sysgate", daemon=True)
        self.thread.start()

    def serve(self, rfile, wfile) -> None:
        """One agent connection: authenticate by token, then answer calls until it closes."""
        try:
            hello = json.loads(rfile.readline() or "null")
            proc = self.agents.table.by_token(hello.get("token", "")) if isinstance(hello, dict) else None
        except ValueError:
            proc = None
        if proc is None:
            self._send(wfile, _error_reply(_unauthorized("invalid process token")))
            return
        self._send(wfile, {"pid": proc.pid})
        for line in rfile:
            self._send(wfile, self._call(proc.pid, line))

    def _call(self, pid: int, line: bytes) -> dict:
        proc = self.agents.table.get(pid)     # fresh: priority, weight and state change
        if proc is None or not proc.state.live:
            return _error_reply(_unauthorized(f"process {pid} has ended"))
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("a call must be a JSON object")
            return {"result": self.agents.syscalls.call(proc, req.get("call"), req.get("args", {}), req.get("seq"))}
        except LLMOSError as e:
            return _error_reply(from_llmos(e))
        except ValueError as e:
            return _error_reply(bad_request(f"call: not valid JSON: {e}", "call"))
        except Exception:
            log.exception("system call failed")
            return _error_reply(APIError(500, "internal server error", "server_error", code="internal_error"))

    @staticmethod
    def _send(wfile, payload: dict) -> None:
        wfile.write(json.dumps(payload).encode() + b"\n")
        wfile.flush()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.path.unlink(missing_ok=True)


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, "authentication_error", code="invalid_process_token")


def _error_reply(err: APIError) -> dict:
    """An error as the gate sends it: POST /v1/sys's body, with the status beside it."""
    return {"status": err.status, **err.body()}
