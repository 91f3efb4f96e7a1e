"""Schemathesis over the server's own OpenAPI schema: generated requests, valid and invalid,
against every operation; no 5xx, and every response matches what the schema documents.
Bounded: a few dozen examples per operation, generation cut to a handful of tokens."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)

from test_server import MODEL, ServerProcess

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
OPERATIONS = [
    ("POST", "/v1/chat/completions", 40), ("POST", "/v1/completions", 40), ("POST", "/v1/embeddings", 25),
    ("GET", "/v1/models", 5), ("GET", "/v1/models/{model}", 10),
    ("GET", "/v1/kernel/requests", 10), ("GET", "/v1/kernel/requests/{request_id}", 10),
    ("POST", "/v1/kernel/requests/{request_id}/cancel", 10), ("POST", "/v1/kernel/requests/{request_id}/suspend", 10),
    ("POST", "/v1/kernel/requests/{request_id}/resume", 10), ("POST", "/v1/kernel/requests/{request_id}/priority", 15),
    ("GET", "/v1/kernel/stats", 5), ("GET", "/health", 3), ("GET", "/ready", 3), ("GET", "/metrics", 3),
    ("POST", "/v1/processes", 15), ("GET", "/v1/processes", 3), ("GET", "/v1/processes/{pid}", 5),
    ("POST", "/v1/processes/{pid}/{action}", 5), ("POST", "/v1/processes/{pid}/renice", 8),
    ("GET", "/v1/processes/{pid}/wait", 5), ("GET", "/v1/processes/{pid}/logs", 5), ("POST", "/v1/messages", 10),
    ("GET", "/v1/messages/dead", 3), ("GET", "/v1/topics/{topic}", 5), ("POST", "/v1/topics/{topic}/publish", 5),
    ("GET", "/v1/audit", 5), ("GET", "/v1/audit/verify", 3), ("POST", "/v1/sys", 10),
    ("GET", "/v1/tools", 3), ("POST", "/v1/tools/{name}/call", 15), ("GET", "/v1/approvals", 5),
    ("GET", "/v1/approvals/{id}", 5), ("POST", "/v1/approvals/{id}/{decision}", 8),
    ("GET", "/v1/fs", 5), ("GET", "/v1/fs/{path}", 5), ("PUT", "/v1/fs/{path}", 8), ("DELETE", "/v1/fs/{path}", 5),
    ("GET", "/v1/kv", 5), ("GET", "/v1/kv/{key}", 5), ("PUT", "/v1/kv/{key}", 10), ("DELETE", "/v1/kv/{key}", 5),
    ("POST", "/v1/memory", 8), ("POST", "/v1/memory/recall", 8), ("DELETE", "/v1/memory/{id}", 5),
    ("POST", "/v1/conversations", 8), ("GET", "/v1/conversations", 3), ("GET", "/v1/conversations/{name}", 5),
    ("DELETE", "/v1/conversations/{name}", 5), ("POST", "/v1/conversations/{name}/messages", 6),
    ("GET", "/v1/adapters", 3), ("POST", "/v1/adapters", 10), ("GET", "/v1/adapters/{name}", 5),
    ("DELETE", "/v1/adapters/{name}", 5),
    ("GET", "/v1/dashboard/whoami", 3), ("GET", "/v1/dashboard/snapshot", 3),
    ("GET", "/v1/cluster", 3), ("POST", "/v1/cluster/scale", 5),
    ("POST", "/v1/fine_tuning/jobs", 5), ("GET", "/v1/fine_tuning/jobs", 3), ("GET", "/v1/fine_tuning/jobs/{job_id}", 3),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel", 3), ("GET", "/v1/fine_tuning/jobs/{job_id}/events", 3),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/pause", 3), ("POST", "/v1/fine_tuning/jobs/{job_id}/resume", 3),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_path):
    # Requests that name no max_tokens get 4, so generated ones stay cheap on 2 cores.
    s = ServerProcess(tmp_path_factory.mktemp("schema"), server={"default_max_tokens": 4})
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def test_every_operation_is_exercised(schema):
    ops = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert ops == {(m, p) for m, p, _ in OPERATIONS}


def _bound(body, model: str) -> None:
    """Keep a generated body cheap without making it valid or invalid: shrink only values
    the schema accepts either way (large token budgets, long prompt and input lists), and
    name a served model, so that valid bodies reach the engine instead of a 404."""
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str) and body["model"]:
        body["model"] = model
    for name in ("max_tokens", "max_completion_tokens"):   # 1906.0 is an integer to pydantic too
        v = body.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 4 and float(v).is_integer():
            body[name] = 4
    if isinstance(body.get("n"), int) and not isinstance(body["n"], bool) and 2 < body["n"] <= 16:
        body["n"] = 2
    for name, keep in (("prompt", 2), ("input", 4)):
        value = body.get(name)
        if isinstance(value, list) and keep < len(value) <= 64 and all(type(v) is type(value[0]) for v in value):
            body[name] = value[:keep]


# Invalid input exists only where there is a body (any path parameter string is valid).
NEGATIVE = {("POST", p) for p in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                  "/v1/kernel/requests/{request_id}/priority", "/v1/processes",
                                  "/v1/processes/{pid}/renice", "/v1/messages", "/v1/sys", "/v1/tools/{name}/call",
                                  "/v1/memory", "/v1/memory/recall", "/v1/conversations",
                                  "/v1/conversations/{name}/messages", "/v1/adapters",
                                  "/v1/cluster/scale", "/v1/fine_tuning/jobs")} | {("PUT", "/v1/kv/{key}")}
CASES = [(m, p, n, mode) for m, p, n in OPERATIONS for mode in ("positive", "negative")
         if mode == "positive" or (m, p) in NEGATIVE]


@pytest.mark.parametrize("method,path,examples,mode", CASES, ids=[f"{m} {p} {mode}" for m, p, _, mode in CASES])
def test_no_server_errors_and_responses_match_schema(server, schema, method, path, examples, mode):
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    operation = schema[path][method]

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode), headers=headers))
    def run(case):
        _bound(case.body, "all-MiniLM-L6-v2" if path == "/v1/embeddings" else MODEL)
        case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=60)

    run()

