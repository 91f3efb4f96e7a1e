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
from llmos.server.errors import from_llmos

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
            self._reply(wfile, {"status": 401, "error": {"message": "invalid process token", "type":
                                "authentication_error", "param": None, "code": "invalid_process_token"}})
            return
        self._reply(wfile, {"pid": proc.pid})
        for line in rfile:
            self._reply(wfile, self._call(proc.pid, line))

    def _call(self, pid: int, line: bytes) -> dict:
        proc = self.agents.table.get(pid)     # fresh: priority, weight and state change
        if proc is None or not proc.state.live:
            return {"status": 401, "error": {"message": f"process {pid} has ended", "type": "authentication_error",
                                             "param": None, "code": "invalid_process_token"}}
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("a call must be a JSON object")
            return {"result": self.agents.syscalls.call(proc, req.get("call"), req.get("args", {}), req.get("seq"))}
        except ValueError as e:
            if isinstance(e, LLMOSError):
                return self._error(e)
            return {"status": 400, "error": {"message": f"call: not valid JSON: {e}", "type": "invalid_request_error",
                                             "param": "call", "code": "invalid_value"}}
        except LLMOSError as e:
            return self._error(e)
        except Exception:
            log.exception("system call failed")
            return {"status": 500, "error": {"message": "internal server error", "type": "server_error",
                                             "param": None, "code": "internal_error"}}

    @staticmethod
    def _error(e: LLMOSError) -> dict:
        err = from_llmos(e)
        return {"status": err.status, **err.body()}

    @staticmethod
    def _reply(wfile, payload: dict) -> None:
        wfile.write(json.dumps(payload).encode() + b"\n")
        wfile.flush()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.path.unlink(missing_ok=True)
