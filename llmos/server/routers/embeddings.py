"""POST /v1/embeddings with all-MiniLM-L6-v2 (384 dimensions, unit length)."""

from __future__ import annotations

import base64

import anyio
from fastapi import APIRouter, Depends

from llmos.server.auth import Principal, authenticate, get_state
from llmos.server.errors import bad_request
from llmos.server.routers.common import check_model, errors
from llmos.server.schemas.openai import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from llmos.server.state import ServerState

router = APIRouter(tags=["openai"])


@router.post("/v1/embeddings", response_model=EmbeddingList, responses=errors(400, 401, 404, 429, 503))
async def embeddings(body: EmbeddingRequest, principal: Principal = Depends(authenticate),
                     state: ServerState = Depends(get_state)):
    embedder = state.embedder
    check_model(state, body.model, "embeddings")
    if body.dimensions is not None and body.dimensions != embedder.dimensions:
        raise bad_request(f"dimensions: {body.model} makes {embedder.dimensions}-dimensional vectors only",
                          "dimensions")
    texts = [body.input] if isinstance(body.input, str) else body.input
    state.drain.admit()
    try:
        tokens = await anyio.to_thread.run_sync(embedder.count_tokens, texts)
        permit = state.limiter.admit(principal.key, tokens)
        try:
            vectors = await anyio.to_thread.run_sync(embedder.embed, texts)
        finally:
            permit.release()
    finally:
        state.drain.leave()
    data = [Embedding(index=i, embedding=base64.b64encode(v.tobytes()).decode() if body.encoding_format == "base64"
                      else v.tolist()) for i, v in enumerate(vectors)]
    return EmbeddingList(data=data, model=body.model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
