"""The FastAPI application: routers, the one error format, and the shared state."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

import llmos
from llmos.api.llm import LLM
from llmos.server import errors
from llmos.server.embeddings import Embedder
from llmos.server.keys import KeyStore
from llmos.server.routers import chat, completions, embeddings, health, kernel, models
from llmos.server.settings import Settings
from llmos.server.state import ServerState


def create_app(settings: Settings, llm: LLM) -> FastAPI:
    """An app serving `llm`; it owns the LLM from here on and closes it at shutdown."""
    state = ServerState(settings=settings, llm=llm, keys=KeyStore(settings.server.keys_path), embedder=Embedder())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.llm.close()
        state.keys.close()

    app = FastAPI(title="llmos", version=llmos.__version__, lifespan=lifespan,
                  description="OpenAI-compatible API and kernel API of llmos, an operating system for LLMs.")
    app.state.llmos = state
    errors.install(app)
    for r in (chat.router, completions.router, embeddings.router, models.router, kernel.router, health.router):
        app.include_router(r)
    return app
