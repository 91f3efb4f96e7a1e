"""The function library as the kernel offers it: one place that finds a tool (registered in
code, built in, or served by an MCP server), validates the arguments against its schema,
asks a person first when the tool needs approval, and runs it in the worker pool.

Who may call what is decided before a call gets here: the syscall table checks an agent's
`tool:<name>` capability, the server checks an HTTP client's key.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from llmos.errors import InvalidRequestError
from llmos.kernel.approvals import Approval, ApprovalBook, ApprovalDenied
from llmos.kernel.capabilities import Capabilities
from llmos.kernel.journal import digest
from llmos.tools.pool import ToolPool
from llmos.tools.registry import NoSuchTool, Tool, ToolContext, ToolError, ToolRegistry


def _jsonable(value: Any) -> Any:
    """A tool's result as JSON can carry it (tuples to lists, objects to text)."""
    return json.loads(json.dumps(value, default=str))


class FunctionLibrary:
    def __init__(self, registry: ToolRegistry, pool: ToolPool, approvals: ApprovalBook, *, mcp=None,
                 approval_timeout: float = 3600.0) -> None:
        self.registry = registry
        self.pool = pool
        self.approvals = approvals
        self.mcp = mcp
        self.approval_timeout = approval_timeout

    def close(self) -> None:
        self.pool.shutdown()
        if self.mcp is not None:
            self.mcp.close()
        self.approvals.close()

    # -- finding tools --------------------------------------------------------------------
    def _mcp_tools(self) -> list[Tool]:
        if self.mcp is None:
            return []
        return [Tool(name=t.name, description=t.description, parameters=t.input_schema or {"type": "object"},
                     func=functools.partial(self._call_mcp, t.name), source="mcp")
                for t in self.mcp.list_tools()]

    def _call_mcp(self, name: str, **args) -> Any:
        return self.mcp.call(name, args, timeout=self.pool.default_timeout)

    def tools(self, caps: tuple[str, ...] | None = None) -> list[Tool]:
        """Every tool, or those a holder of `caps` may call."""
        everything = self.registry.list() + self._mcp_tools()
        if caps is None:
            return everything
        have = Capabilities(caps)
        return [t for t in everything if have.allows(f"tool:{t.name}")]

    def get(self, name) -> Tool:
        try:
            return self.registry.get(name)
        except NoSuchTool:
            if isinstance(name, str) and name.startswith("mcp"):
                for t in self._mcp_tools():
                    if name in (t.name, t.function_name):
                        return t
            raise

    # -- calling them ---------------------------------------------------------------------
    def call(self, ctx: ToolContext, name: str, args, *, wait: float = 0.0) -> dict:
        """{"result": value} once the tool ran, or {"pending": approval id} while a person
        has not yet decided (after waiting up to `wait` seconds for them)."""
        tool = self.get(name)
        args = tool.validate({} if args is None else args)
        if not tool.needs_approval:
            return {"result": _jsonable(self.pool.run(tool, args, ctx))}
        if ctx.pid == 0 and wait <= 0:
            raise InvalidRequestError(f"name: {tool.name} needs a person's approval, which only agent "
                                      f"processes can wait for")
        a = self.approvals.request(tenant=ctx.tenant, pid=ctx.pid, tool=tool.name, args=args,
                                   digest=digest({"tool": tool.name, "args": args}),
                                   timeout=self.approval_timeout)
        return self.await_approval(ctx, a.id, wait=wait)

    def await_approval(self, ctx: ToolContext, approval_id: str, *, wait: float = 0.0) -> dict:
        """Carry a call that needed approval on: still pending, run now (exactly once),
        the stored outcome, or ApprovalDenied."""
        while True:
            a = self.approvals.wait(approval_id, wait) if wait > 0 else self.approvals.get(approval_id)
            if a.tenant != ctx.tenant or a.pid != ctx.pid:
                raise InvalidRequestError(f"id: no approval request {approval_id!r} of this process")
            if a.state in ("pending", "running"):
                return {"pending": a.id, "state": a.state}
            if a.state in ("denied", "expired"):
                raise ApprovalDenied(a)
            if a.state == "done":
                return _outcome(a)
            if self.approvals.claim(a.id):
                return self._run_approved(ctx, a)

    def _run_approved(self, ctx: ToolContext, a: Approval) -> dict:
        try:
            value = _jsonable(self.pool.run(self.get(a.tool), a.args, ctx))
        except Exception as e:
            self.approvals.finish(a.id, {"error": {"kind": type(e).__name__, "message": str(e)}})
            raise
        self.approvals.finish(a.id, {"ok": value})
        return {"result": value, "approval": a.id}


def _outcome(a: Approval) -> dict:
    if a.result and "error" in a.result:
        raise ToolError(a.result["error"]["message"])
    return {"result": (a.result or {}).get("ok"), "approval": a.id}
