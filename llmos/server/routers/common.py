"""What the routers share: the documented error responses and the model check."""

from __future__ import annotations

from pydantic import BaseModel

from llmos.server.errors import APIError, ErrorResponse
from llmos.server.state import ServerState


def errors(*statuses: int) -> dict:
    return {s: {"model": ErrorResponse} for s in statuses}


GENERATION_ERRORS = errors(400, 401, 403, 404, 413, 429, 503)


def event_stream(chunk: type[BaseModel]) -> dict:
    """The 200 response of a streaming request: server-sent events whose data is a chunk, an
    error (if the request fails after the stream began) or the final "[DONE]". Models the
    chunk refers to go to the schema's components (app._openapi moves the $defs)."""
    event = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
        chunk.model_json_schema(ref_template="#/components/schemas/{model}"),
        {"$ref": "#/components/schemas/ErrorResponse"}]}}
    return {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"], "description": "one server-sent event",
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, event]}}}}}


def check_model(state: ServerState, name: str, kind: str = "generation") -> None:
    """404 for a model this server does not serve; 400 for one that cannot do `kind`."""
    served = {state.model_name: "generation", state.embedder.name: "embeddings"}
    if name not in served:
        raise APIError(404, f"model: {name!r} is not served here; available: {', '.join(served)}", param="model",
                       code="model_not_found")
    if served[name] != kind:
        raise APIError(400, f"model: {name!r} does not do {kind}", param="model", code="invalid_model")
