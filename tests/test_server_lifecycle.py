"""Configuration, running without auth on loopback, and draining on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import tomllib

import httpx
import pytest

from llmos.errors import InvalidRequestError
from llmos.server.settings import load_settings
from test_server import ROOT, LongStream, ServerProcess, chat_body, kernel_requests, wait_for


def llmos(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmos.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_config_file_then_flags(tmp_path):
    cfg = tmp_path / "llmos.toml"
    cfg.write_text('[engine]\nkv_cache_memory = "128MiB"\nmax_num_seqs = 8\nscheduling_policy = "priority"\n'
                   '[server]\nport = 9001\ndrain_timeout = 3\n')
    out = llmos("config", "--config", str(cfg), "--port", "9002", "--set", "engine.max_num_seqs=4",
                "--set", "server.log_level=debug")
    assert out.returncode == 0, out.stderr
    effective = tomllib.loads(out.stdout)
    assert effective["engine"]["kv_cache_memory"] == "128MiB" and effective["engine"]["max_num_seqs"] == 4
    assert effective["engine"]["scheduling_policy"] == "priority" and effective["engine"]["block_size"] == 16
    assert effective["server"] == {**effective["server"], "port": 9002, "drain_timeout": 3, "log_level": "debug",
                                   "auth": True, "host": "127.0.0.1"}
    assert tomllib.loads(llmos("config").stdout)["engine"]["scheduling_policy"] == "fair"   # the server's default


@pytest.mark.parametrize("overrides,match", [
    ({"server.auth": False, "server.host": "0.0.0.0"}, "loopback"),
    ({"engine.scheduling_policy": "lottery"}, "scheduling_policy"),
    ({"engine.kv_cache_memory": "lots"}, "kv_cache_memory"),
    ({"server.port": 70000}, "server.port"),
    ({"engine.colour": "blue"}, "colour"),
    ({"gpu.count": 1}, "gpu.count"),
])
def test_bad_settings_are_refused(overrides, match):
    with pytest.raises(InvalidRequestError, match=match):
        load_settings(None, overrides)


def test_no_auth_refused_off_loopback():
    out = llmos("serve", "--host", "0.0.0.0", "--no-auth")
    assert out.returncode == 1 and "loopback" in out.stderr


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, default_model_path):
    s = ServerProcess(tmp_path_factory.mktemp("noauth"), auth=False, server={"drain_timeout": 60})
    yield s
    s.stop()


def test_no_auth_runs_everything_as_default(open_server):
    with httpx.Client(base_url=open_server.url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json=chat_body(max_tokens=2))
        assert r.status_code == 200
        stream = LongStream(open_server)
        stream.next_event()
        assert [r["tenant"] for r in kernel_requests(http)] == ["default"]
        assert http.get("/metrics").status_code == 200
        stream.close()


def test_sigterm_drains_then_exits_zero(open_server):
    """In-flight requests finish; new ones get 503; the process exits 0. Runs last: it ends the server."""
    stream = LongStream(open_server, max_tokens=40)
    stream.next_event()
    events: list = []
    reader = threading.Thread(target=lambda: events.extend(iter(stream.next_event, "[DONE]")))
    reader.start()
    open_server.proc.send_signal(signal.SIGTERM)
    with httpx.Client(base_url=open_server.url, timeout=30) as http:
        assert wait_for(lambda: http.get("/ready").status_code == 503)
        assert http.get("/health").status_code == 200
        r = http.post("/v1/chat/completions", json=chat_body(max_tokens=2))
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining" and "retry-after" in r.headers
        assert http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x"}).status_code == 503
    reader.join(120)
    assert events and events[-1]["choices"][0]["finish_reason"] == "length"     # finished, not cut off
    assert sum(1 for e in events if e["choices"][0]["delta"].get("content")) > 1
    stream.close()
    assert open_server.proc.wait(60) == 0


def test_drain_timeout_cancels_what_is_left(tmp_path, default_model_path):
    server = ServerProcess(tmp_path, auth=False, server={"drain_timeout": 1})
    stream = LongStream(server, max_tokens=4000)
    stream.next_event()
    server.proc.send_signal(signal.SIGTERM)
    finish = None
    while (e := stream.next_event()) != "[DONE]":
        finish = e["choices"][0]["finish_reason"] or finish
    assert finish == "abort"
    stream.close()
    assert server.proc.wait(60) == 0
