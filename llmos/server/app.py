"""The FastAPI application: routers, the one error format, and the shared state."""

from __future__ import annotations

from contextlib import asynccontextmanager

import anyio

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

import llmos
from llmos.api.llm import LLM
from llmos.server import errors
from llmos.server.embeddings import Embedder
from llmos.server.keys import KeyStore
from llmos.server.routers import chat, completions, embeddings, health, kernel, models
from llmos.server.settings import Settings
from llmos.server.state import ServerState


SUBMIT_THREADS = 256


def create_app(settings: Settings, llm: LLM) -> FastAPI:
    """An app serving `llm`; it owns the LLM from here on and closes it at shutdown."""
    state = ServerState(settings=settings, llm=llm, keys=KeyStore(settings.server.keys_path), embedder=Embedder())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.submit_limiter = anyio.CapacityLimiter(SUBMIT_THREADS)
        yield
        state.llm.close()
        state.keys.close()

    app = FastAPI(title="llmos", version=llmos.__version__, lifespan=lifespan,
                  description="OpenAI-compatible API and kernel API of llmos, an operating system for LLMs.")
    app.state.llmos = state
    errors.install(app)
    for r in (chat.router, completions.router, embeddings.router, models.router, kernel.router, health.router):
        app.include_router(r)
    app.openapi = lambda: _openapi(app)
    return app


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
