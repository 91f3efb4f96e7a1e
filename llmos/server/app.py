"""The FastAPI application: routers, the one error format, and the shared state."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

import asyncio
import logging
import shutil
import tempfile

import anyio

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

import llmos
from llmos.api.llm import LLM
from llmos.server import errors
from llmos.kernel.agents import AgentKernel
from llmos.kernel.intrusion import IntrusionDetector
from llmos.server.agents import ProcessLLM
from llmos.server.embeddings import Embedder
from llmos.server.keys import KeyStore
from llmos.server.monitor import Monitor
from llmos.server.routers import (adapters, chat, cluster, completions, dashboard, embeddings, health, kernel,
                                  library, models, processes)
from llmos.server.settings import Settings
from llmos.server.sysgate import SyscallGate
from llmos.server.state import ServerState
from llmos.server.routers import fine_tuning
from llmos.config import llmos_home
from llmos.kernel.approvals import ApprovalBook
from llmos.kernel.conversation import ConversationStore
from llmos.kernel.memory import SemanticMemory
from llmos.tools import builtins
from llmos.tools.library import FunctionLibrary
from llmos.tools.pool import ToolPool
from llmos.tools.registry import DEFAULT, ToolRegistry


SUBMIT_THREADS = 256
log = logging.getLogger("llmos.server")


def gate_path(agents_dir: Path) -> tuple[Path, Path | None]:
    """Where the syscall gate's socket lives, and a directory made for it to remove at the
    end: AF_UNIX paths hold about 100 bytes, so a deep agents directory gets a private one."""
    sock = agents_dir / "kernel.sock"
    if len(str(sock)) < 100:
        return sock, None
    private = Path(tempfile.mkdtemp(prefix="llmos-gate-"))
    return private / "kernel.sock", private


def create_app(settings: Settings, llm: LLM) -> FastAPI:
    """An app serving `llm`; it owns the LLM from here on and closes it at shutdown."""
    s = settings.server
    state = ServerState(settings=settings, llm=llm, keys=KeyStore(s.keys_path), embedder=Embedder(),
                        guard=IntrusionDetector(auth_threshold=s.auth_failure_threshold), monitor=Monitor(llm))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.submit_limiter = anyio.CapacityLimiter(SUBMIT_THREADS)
        host = s.host if ":" not in s.host else f"[{s.host}]"
        sock, sock_dir = gate_path(s.agents_path)
        services = build_services(settings, state)
        if settings.agents.confinement == "none":
            log.warning("agents run UNCONFINED ([agents] confinement = \"none\"): a capability binds only the "
                        "agents that choose to ask, and every agent can read what this server can")
        state.agents = AgentKernel(s.agents_path, f"http://{host}:{s.port}", ProcessLLM(state.llm, state.embedder),
                                   socket=sock, confinement=settings.agents,
                                   kill_grace=s.kill_grace, denial_threshold=s.denial_threshold,
                                   max_restarts=s.max_restarts, restart_backoff=(0.1, s.restart_backoff_max),
                                   **services)
        gate = SyscallGate(sock, state.agents)
        jobs = fine_tuning.start(app, state)
        sampler = asyncio.get_running_loop().create_task(state.monitor.run(), name="llmos-monitor")
        yield
        sampler.cancel()
        jobs.shutdown()
        gate.close()
        if sock_dir is not None:
            shutil.rmtree(sock_dir, ignore_errors=True)
        state.agents.shutdown()
        services["library"].close()
        services["memory"].close()
        state.llm.close()
        state.keys.close()

    app = FastAPI(title="llmos", version=llmos.__version__, lifespan=lifespan,
                  description="OpenAI-compatible API and kernel API of llmos, an operating system for LLMs.")
    app.state.llmos = state
    errors.install(app)
    for r in (chat.router, completions.router, embeddings.router, models.router, kernel.router, processes.router,
              processes.sys_router, library.router, health.router, dashboard.router, adapters.router,
              cluster.router):
        app.include_router(r)
    app.include_router(fine_tuning.router)
    app.openapi = lambda: _openapi(app)
    return app


def build_services(settings: Settings, state: ServerState) -> dict:
    """The function library (registry, worker pool, approvals, MCP servers), semantic memory
    and conversations the agent kernel and the HTTP API share."""
    s, t = settings.server, settings.tools
    home = s.agents_path
    home.mkdir(parents=True, exist_ok=True)
    registry = ToolRegistry()
    builtins.install(registry, http_allow_hosts=t.http_allow_hosts)
    registry.absorb(DEFAULT)
    for module in t.modules:
        registry.load_module(module)
    hub = None
    if settings.mcp_servers:
        from llmos.tools.mcp import MCPHub   # the mcp SDK takes most of a second to import
        hub = MCPHub(settings.mcp_servers)
        hub.start()
    library = FunctionLibrary(registry, ToolPool(t.workers, default_timeout=t.timeout, max_waiting=t.max_waiting),
                              ApprovalBook(home / "approvals.db"), mcp=hub, approval_timeout=t.approval_timeout)
    memory = SemanticMemory(home / "memory.db", state.embedder.embed, state.embedder.dimensions)
    tokenizer = state.llm.get_tokenizer()
    conversations = ConversationStore(home / "conversations.db", memory, lambda text: len(tokenizer.encode(text)),
                                      budget=t.conversation_budget)
    hidden = sorted({str(llmos_home()), str(s.keys_path.parent), str(home)})
    return {"library": library, "memory": memory, "conversations": conversations, "hidden_paths": hidden}


def _openapi(app: FastAPI) -> dict:
    """FastAPI documents a 422 for every body; invalid input is a 400 here (errors.install)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path in schema["paths"].values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
                for content in op.get("responses", {}).get("200", {}).get("content", {}).values():
                    _hoist_defs(content.get("schema", {}), components)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def _hoist_defs(node, components: dict) -> None:
    """Move pydantic's nested $defs into the schema's components, where their $refs point."""
    if isinstance(node, dict):
        components.update(node.pop("$defs", {}))
        for v in node.values():
            _hoist_defs(v, components)
    elif isinstance(node, list):
        for v in node:
            _hoist_defs(v, components)
