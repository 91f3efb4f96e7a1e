"""The MCP hub: llmos's client for tools served by MCP (Model Context Protocol) servers,
through the official `mcp` SDK.

Each configured server is one link, kept up by a task on the hub's private event-loop
thread: it spawns the server (stdio) or opens its URL (streamable HTTP), fetches the tool
list, then watches the link and reconnects with backoff when it dies. The kernel sees only
synchronous, thread-safe methods (its tool worker pool calls them from many threads), and
no server can hold them hostage: listing returns what the links last fetched after waiting
at most `list_timeout` for first connections, a call is bounded by its timeout and fails as
soon as the link under it dies, and closing stops every child through the SDK's shutdown
(close stdin, then SIGTERM, then SIGKILL to its process group), which also reaps it.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from concurrent.futures import CancelledError, Future, TimeoutError as FutureTimeout, wait
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal
from mcp import Client, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError as SDKError
from mcp.types import CONNECTION_CLOSED, CallToolResult, Implementation

from llmos.errors import InvalidRequestError, LLMOSError

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_BACKOFF_FIRST, _BACKOFF_MAX = 0.2, 5.0     # seconds between reconnect attempts
_PAGE_CAP = 100        # tools/list pages read per listing: an endless paginator cannot wedge a link
_GRACE = 2.0           # the loop's own answer to a call may lag its timeout by this much
_CLIENT_INFO = Implementation(name="llmos", version="0.1.0")


def _seconds(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


@dataclass
class MCPServerConfig:
    """One MCP server: a command to spawn and talk to over stdio, or a streamable-HTTP URL.
    A spawned server inherits only the SDK's safe variables (PATH, HOME, USER, ...) plus
    `env`. `timeout` bounds connecting (handshake and tool listing) and is a call's default."""

    name: str
    command: list[str] | None = None
    url: str | None = None
    env: dict | None = None
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise InvalidRequestError(f"mcp server name: {self.name!r} must be letters, digits, '_' or '-' "
                                      f"(it is part of every tool name, mcp.<server>.<tool>)")
        where = f"mcp server {self.name}"
        if (self.command is None) == (self.url is None):
            raise InvalidRequestError(f"{where}: give exactly one of command (stdio) or url (HTTP)")
        if self.command is not None and not (isinstance(self.command, list) and self.command
                                             and all(isinstance(a, str) and a for a in self.command)):
            raise InvalidRequestError(f"{where}: command must be a non-empty list of non-empty strings")
        if self.url is not None and not (isinstance(self.url, str) and re.match(r"https?://\S+$", self.url)):
            raise InvalidRequestError(f"{where}: url must be an http:// or https:// URL, got {self.url!r}")
        if self.env is not None:
            if self.url is not None:
                raise InvalidRequestError(f"{where}: env applies only to a spawned (command) server")
            if not (isinstance(self.env, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in self.env.items())):
                raise InvalidRequestError(f"{where}: env must map strings to strings")
        if not _seconds(self.timeout):
            raise InvalidRequestError(f"{where}: timeout must be a positive number of seconds")


@dataclass
class MCPTool:
    """A tool an MCP server offers, under the name llmos calls it by."""

    name: str               # "mcp.<server>.<tool>"
    server: str
    tool: str
    description: str
    input_schema: dict


class MCPError(LLMOSError):
    """An MCP tool call did not produce a result: the server is down, the link died during
    the call, the call timed out, or the tool reported an error. The message says which."""


def _describe(exc: BaseException) -> str:
    """An exception as one line; task groups wrap a transport's failure in groups of one."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _transport(config: MCPServerConfig):
    if config.command is not None:
        return stdio_client(StdioServerParameters(command=config.command[0], args=config.command[1:],
                                                  env=config.env))
    return streamable_http_client(config.url)


@asynccontextmanager
async def _watched(transport, link: _Link, lost: anyio.Event):
    """`transport`, opened outside the reach of `MCPHub.close` (see `_Link.stop`), with its
    read side relayed through a pump that notices the stream end. The SDK fails requests
    in flight when the link closes but tells no one else; the hub must know at once, to
    take the link out of service before a caller picks it again and to bring it back even
    when idle."""
    link.opening = True
    try:
        async with transport as (read, write):
            link.opened()
            send, receive = anyio.create_memory_object_stream(0)

            async def pump() -> None:
                try:
                    async with send:
                        async for item in read:
                            await send.send(item)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass
                finally:
                    link.drop()
                    lost.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(pump)
                try:
                    yield receive, write
                finally:
                    tg.cancel_scope.cancel()
    finally:
        link.opened()


async def _list_tools(client: Client, server: str) -> tuple[MCPTool, ...]:
    tools: list[MCPTool] = []
    cursor = None
    for _ in range(_PAGE_CAP):
        page = await client.list_tools(cursor=cursor)
        tools += [MCPTool(f"mcp.{server}.{t.name}", server, t.name, t.description or "",
                          dict(t.input_schema or {})) for t in page.tools]
        cursor = page.next_cursor
        if cursor is None:
            break
    return tuple(tools)


def _result_value(name: str, result: CallToolResult) -> Any:
    """The structured content if the server gave it, else the text blocks joined. The
    SDK's servers wrap a non-object return value as {"result": value}; that is unwrapped."""
    text = "\n".join(getattr(block, "text", None) or f"[{block.type} content]" for block in result.content)
    if result.is_error:
        raise MCPError(f"{name} failed: {text or 'the server gave no reason'}")
    data = result.structured_content
    if data is None:
        return text
    return data["result"] if isinstance(data, dict) and list(data) == ["result"] else data


class _Link:
    """One server's connection and what the hub knows of it. The loop thread writes the
    snapshot (tools, connected, last_error, restarts) under `lock`; any thread reads it."""

    def __init__(self, config: MCPServerConfig) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.settled = threading.Event()    # the first connection attempt has ended, either way
        self.tools: tuple[MCPTool, ...] = ()
        self.connected = False
        self.last_error: str | None = None
        self.restarts = 0
        self.client: Client | None = None   # loop thread only, like the two below
        self.up: anyio.Event | None = None  # set while connected; replaced when the link drops
        self.scope: anyio.CancelScope | None = None
        self.opening = self.stopping = False
        self._delay = _BACKOFF_FIRST
        self._ever_up = False

    def arm(self) -> None:
        """Fresh loop-side state for a hub (re)start; runs on the loop."""
        self.up, self.scope = anyio.Event(), anyio.CancelScope()
        self.opening = self.stopping = False

    def stop(self) -> None:
        """Cancel the link's task, but never while the transport is being opened: asyncio,
        cancelled while spawning a child, kills it and leaves it unreaped (the SDK cannot
        see a process it never got). The stop then lands as soon as the open is done."""
        self.stopping = True
        if not self.opening:
            self.scope.cancel()

    def opened(self) -> None:
        self.opening = False
        if self.stopping:
            self.scope.cancel()

    def attach(self, client: Client, tools: tuple[MCPTool, ...]) -> None:
        self.client = client
        with self.lock:
            self.tools, self.connected = tools, True
            self.restarts += self._ever_up
        self._ever_up, self._delay = True, _BACKOFF_FIRST
        self.up.set()
        self.settled.set()
        log.info("mcp server %s connected, %d tools", self.config.name, len(tools))

    def refresh(self, tools: tuple[MCPTool, ...]) -> None:
        with self.lock:
            self.tools = tools

    def drop(self) -> None:
        """The link is gone: take it out of service before anyone can call through it."""
        self.client = None
        if self.up.is_set():
            self.up = anyio.Event()
        with self.lock:
            self.tools, self.connected = (), False

    def failed(self, error: str) -> float:
        """Record why the link ended; returns how long to wait before the next attempt."""
        self.drop()
        with self.lock:
            repeated, self.last_error = error == self.last_error, error
        self.settled.set()
        (log.debug if repeated else log.warning)("mcp server %s: %s; reconnecting in %.1fs",
                                                 self.config.name, error, self._delay)
        delay, self._delay = self._delay, min(self._delay * 2, _BACKOFF_MAX)
        return delay

    def close(self) -> None:
        """The hub closed: nothing is connected and no first attempt is pending."""
        self.client = None
        with self.lock:
            self.tools, self.connected = (), False
        self.settled.clear()

    def status(self) -> dict:
        with self.lock:
            return {"name": self.config.name, "transport": "stdio" if self.config.command else "http",
                    "connected": self.connected, "tools": len(self.tools),
                    "last_error": self.last_error, "restarts": self.restarts}


class MCPHub:
    """Every configured MCP server's tools, as `mcp.<server>.<tool>`, callable from any thread.

    `heartbeat` is how often a connected link re-lists its tools: that finds tools a server
    added or removed, and an HTTP server that went away while idle (a stdio server's death
    is seen at once, when its pipe closes)."""

    def __init__(self, servers: list[MCPServerConfig], *, list_timeout: float = 5.0,
                 heartbeat: float = 10.0) -> None:
        names = [s.name for s in servers]
        if len(set(names)) != len(names):
            raise InvalidRequestError(f"mcp servers: names must be unique, got {names}")
        if not (list_timeout > 0 and heartbeat > 0):
            raise InvalidRequestError("mcp hub: list_timeout and heartbeat must be positive")
        self.list_timeout = list_timeout
        self.heartbeat = heartbeat
        self._links = {s.name: _Link(s) for s in servers}
        self._lock = threading.Lock()
        self._portal: BlockingPortal | None = None
        self._stack: ExitStack | None = None
        self._tasks: list[Future] = []

    # -- the public, synchronous side -----------------------------------------------------
    def start(self) -> None:
        """Start connecting to every server in the background; returns at once."""
        with self._lock:
            if self._portal is not None:
                return
            self._stack = ExitStack()
            self._portal = self._stack.enter_context(start_blocking_portal(name="llmos-mcp"))
            self._portal.call(self._arm)
            self._tasks = [self._portal.start_task_soon(self._serve, link) for link in self._links.values()]

    def list_tools(self) -> list[MCPTool]:
        """Every connected server's tools. Waits up to `list_timeout` for servers still making
        their first connection attempt, never for a server's answer."""
        if self._portal is not None:
            deadline = time.monotonic() + self.list_timeout
            for link in self._links.values():
                link.settled.wait(max(0.0, deadline - time.monotonic()))
        tools = []
        for link in self._links.values():
            with link.lock:
                tools += link.tools
        return tools

    def call(self, name: str, args: dict, timeout: float | None = None) -> Any:
        """Run `mcp.<server>.<tool>` with `args`; its result, or MCPError within `timeout`
        (the server's configured timeout if None), sooner if the link dies first."""
        link, tool = self._resolve(name)
        if not isinstance(args, dict):
            raise InvalidRequestError(f"args: the arguments of {name} must be an object")
        timeout = link.config.timeout if timeout is None else timeout
        if not _seconds(timeout):
            raise InvalidRequestError(f"timeout: must be a positive number of seconds, got {timeout}")
        portal = self._portal
        if portal is None:
            raise MCPError(f"{name}: the MCP hub is not running")
        try:
            future = portal.start_task_soon(self._call, link, tool, args, timeout)
        except RuntimeError:
            raise MCPError(f"{name}: the MCP hub is closing") from None
        try:
            return future.result(timeout + _GRACE)
        except FutureTimeout:
            future.cancel()
            raise MCPError(f"{name}: no answer within {timeout:g}s") from None
        except CancelledError:
            raise MCPError(f"{name}: the MCP hub closed during the call") from None

    def status(self) -> list[dict]:
        """Per server: name, transport, connected, tools (count), last_error (the latest, kept
        after a recovery) and restarts (reconnections after the link was lost)."""
        return [link.status() for link in self._links.values()]

    def close(self) -> None:
        """Close every session and stop every server process; the hub can be started again."""
        with self._lock:
            portal, stack, tasks = self._portal, self._stack, self._tasks
            self._portal, self._stack, self._tasks = None, None, []
        if portal is None:
            return
        portal.call(self._stop_all)
        wait(tasks)
        stack.close()
        for link in self._links.values():
            link.close()

    def _resolve(self, name: str) -> tuple[_Link, str]:
        prefix, _, rest = name.partition(".") if isinstance(name, str) else ("", "", "")
        server, _, tool = rest.partition(".")
        if prefix != "mcp" or not tool:
            raise InvalidRequestError(f"name: {name!r} is not an MCP tool name (mcp.<server>.<tool>)")
        if server not in self._links:
            raise InvalidRequestError(f"name: {name!r} names no configured MCP server ({server!r})")
        return self._links[server], tool

    # -- the event-loop side --------------------------------------------------------------
    async def _arm(self) -> None:
        for link in self._links.values():
            link.arm()

    async def _stop_all(self) -> None:
        for link in self._links.values():
            link.stop()

    async def _serve(self, link: _Link) -> None:
        """Keep one server connected until the hub closes."""
        with link.scope:
            while True:
                try:
                    await self._session(link)
                    error = "the connection closed"
                except Exception as exc:
                    error = _describe(exc)
                await anyio.sleep(link.failed(error))

    async def _session(self, link: _Link) -> None:
        """One connection, from spawn or open to its end. The handshake and first listing
        share the server's timeout, so a server that hangs in either cannot stall the link."""
        config = link.config
        lost = anyio.Event()
        with anyio.CancelScope(deadline=anyio.current_time() + config.timeout) as connecting:
            transport = _watched(_transport(config), link, lost)
            async with Client(transport, client_info=_CLIENT_INFO, cache=None) as client:
                tools = await _list_tools(client, config.name)
                connecting.deadline = math.inf
                link.attach(client, tools)
                await self._watch(link, client, lost)
        if connecting.cancelled_caught:
            raise TimeoutError(f"no answer to the handshake or tools/list within {config.timeout:g}s")

    async def _watch(self, link: _Link, client: Client, lost: anyio.Event) -> None:
        """Return when the link is lost: its stream ended, or a heartbeat listing failed."""
        while True:
            with anyio.move_on_after(self.heartbeat):
                await lost.wait()
                return
            with anyio.fail_after(link.config.timeout):
                link.refresh(await _list_tools(client, link.config.name))

    async def _call(self, link: _Link, tool: str, args: dict, timeout: float) -> Any:
        name, server = f"mcp.{link.config.name}.{tool}", link.config.name
        deadline = anyio.current_time() + timeout
        if link.client is None:     # (re)connecting: wait a little, as a listing would
            with anyio.move_on_after(min(timeout, self.list_timeout)):
                await link.up.wait()
        client = link.client
        if client is None:
            reason = link.status()["last_error"] or "still connecting"
            raise MCPError(f"{name}: MCP server {server} is not connected ({reason})")
        try:
            with anyio.fail_after(deadline - anyio.current_time()):
                result = await client.call_tool(tool, args)
        except TimeoutError:
            raise MCPError(f"{name}: no answer within {timeout:g}s") from None
        except SDKError as exc:
            if exc.code == CONNECTION_CLOSED:
                raise MCPError(f"{name}: the link to MCP server {server} died during the call") from None
            raise MCPError(f"{name}: MCP server {server} refused the call: {exc}") from None
        except Exception as exc:
            raise MCPError(f"{name}: {_describe(exc)}") from None
        return _result_value(name, result)
