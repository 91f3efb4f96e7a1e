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


def check_model(state: ServerState, name: str, kind: str = "generation") -> str | None:
    """The LoRA adapter a model name selects -- "BASE:ADAPTER" (its id in /v1/models) or
    the adapter's bare name -- or None for the base model. 404 for a model or adapter this
    server does not serve; 400 for one that cannot do `kind`."""
    served = {state.model_name: "generation", state.embedder.name: "embeddings"}
    if name in served:
        if served[name] != kind:
            raise APIError(400, f"model: {name!r} does not do {kind}", param="model", code="invalid_model")
        return None
    base, sep, adapter = name.rpartition(":")
    if kind == "generation" and sep and base == state.model_name:
        if state.llm.adapter(adapter) is None:
            raise APIError(404, f"model: {state.model_name} has no adapter {adapter!r} loaded; "
                                f"see /v1/adapters", param="model", code="adapter_not_found")
        return adapter
    if kind == "generation" and not sep and state.llm.adapter(name) is not None:
        return name
    raise APIError(404, f"model: {name!r} is not served here; available: {', '.join(served)} "
                        f"(and {state.model_name}:ADAPTER for each loaded LoRA adapter)", param="model",
                   code="model_not_found")


def adapter_model_id(state: ServerState, adapter: str) -> str:
    """An adapter's model id, as /v1/models lists it and requests name it."""
    return f"{state.model_name}:{adapter}"
