"""A tiny MCP server for the MCP hub's tests, built on the official SDK's MCPServer.

Runs over stdio by default, or over streamable HTTP with `--http PORT`. Misbehaviour is
chosen with `--hang init` (never finishes starting, so initialize is never answered) or
`--hang list` (answers initialize, then never answers tools/list).

`--raw` serves `add` and `echo` over stdio with a hand-written JSON-RPC loop instead: the
SDK takes about a second to import, which would make a test of a hundred spawn-and-close
cycles take minutes; the raw loop starts in milliseconds and speaks the legacy handshake.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_RAW_TOOLS = [
    {"name": "add", "description": "Add two integers.", "inputSchema": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"]}},
    {"name": "echo", "description": "Return the text unchanged.", "inputSchema": {
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}},
]


def _raw_answer(method: str, params: dict) -> dict:
    if method == "initialize":
        return {"result": {"protocolVersion": params["protocolVersion"], "capabilities": {"tools": {}},
                           "serverInfo": {"name": "echo-raw", "version": "0"}}}
    if method == "tools/list":
        return {"result": {"tools": _RAW_TOOLS}}
    if method == "tools/call":
        args = params.get("arguments") or {}
        value = args["a"] + args["b"] if params["name"] == "add" else args.get("text")
        return {"result": {"content": [{"type": "text", "text": str(value)}],
                           "structuredContent": {"result": value}, "isError": False}}
    return {"error": {"code": -32601, "message": f"method not found: {method}"}}


def serve_raw() -> None:
    for line in sys.stdin:
        message = json.loads(line)
        if "id" in message and "method" in message:
            reply = {"jsonrpc": "2.0", "id": message["id"], **_raw_answer(message["method"],
                                                                         message.get("params") or {})}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()


def build(hang: str | None = None):
    """The SDK server with its tools; `hang` as described above."""
    from contextlib import asynccontextmanager

    import anyio
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    @asynccontextmanager
    async def never_ready(_server):
        await anyio.sleep_forever()
        yield {}

    server = MCPServer("echo", lifespan=never_ready if hang == "init" else None, log_level="WARNING")
    if hang == "list":
        async def list_tools_forever():
            await anyio.sleep_forever()
        server.list_tools = list_tools_forever

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @server.tool()
    async def sleep(seconds: float) -> str:
        """Sleep, then say so."""
        await anyio.sleep(seconds)
        return f"slept {seconds}"

    @server.tool()
    def fail(message: str) -> str:
        """Raise, so the result comes back with isError set and the message in its text."""
        raise ToolError(message)

    @server.tool()
    def crash() -> str:
        """End this server process at once, without a reply."""
        os._exit(3)

    @server.tool()
    def pid() -> int:
        """This server's OS process id."""
        return os.getpid()

    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, metavar="PORT")
    parser.add_argument("--hang", choices=["init", "list"])
    parser.add_argument("--raw", action="store_true")
    args = parser.parse_args()
    if args.raw:
        serve_raw()
    elif args.http:
        build(args.hang).run("streamable-http", host="127.0.0.1", port=args.http)
    else:
        build(args.hang).run()


if __name__ == "__main__":
    main()
