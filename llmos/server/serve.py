"""`llmos serve`: load the model, print how to reach it, run uvicorn, drain on SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading

import uvicorn

from llmos.server.app import create_app
from llmos.server.keys import local_key
from llmos.server.settings import Settings
from llmos.server.state import ServerState

log = logging.getLogger("llmos.server")


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM first drains: new requests get 503 while the ones in
    flight finish (up to drain_timeout, then they are cancelled), then the server exits 0.
    A second SIGTERM, or SIGINT, stops at once as uvicorn does."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and not self.state.drain.draining:
            self.state.drain.begin()
            threading.Thread(target=self._drain, name="llmos-drain", daemon=True).start()
        else:
            super().handle_exit(sig, frame)

    def _drain(self) -> None:
        timeout = self.state.settings.server.drain_timeout
        log.info("SIGTERM: draining %d request(s) in flight (up to %.0f s)", self.state.drain.in_flight, timeout)
        if not self.state.drain.wait_idle(timeout):
            left = [r.request_id for r in self.state.llm.list_requests()]
            log.warning("drain timeout: cancelling %d request(s)", len(left))
            for rid in left:
                handle = self.state.llm.request(rid)
                if handle is not None:
                    handle.cancel()
            self.state.drain.wait_idle(5.0)
        self.should_exit = True


def serve(settings: Settings) -> int:
    engine = dict(settings.engine)
    if settings.cluster.enabled:
        from llmos.cluster.cluster import ClusterLLM
        llm = ClusterLLM(engine.pop("model"), **settings.cluster.options(), **engine)
    else:
        from llmos.api.llm import LLM
        llm = LLM(engine.pop("model"), **engine)
    app = create_app(settings, llm)
    state: ServerState = app.state.llmos
    s = settings.server
    url = f"http://{s.host if ':' not in s.host else f'[{s.host}]'}:{s.port}"
    auth = ""
    lines = [f"llmos is serving {state.model_name} (and {state.embedder.name} embeddings) at {url}"]
    if settings.cluster.enabled:
        lines.append(f"cluster: {len(llm.replicas())} engine replicas on Ray (`llmos cluster status`)")
    lines.append(f"dashboard: {url}/   (`llmos top` in a terminal)")
    if s.auth:
        key = local_key(state.keys, s.keys_path.with_name("api_key"))
        auth = f' -H "Authorization: Bearer {key}"'
        lines.append(f"API key (admin, tenant 'default'; more with `llmos keys create`): {key}")
    else:
        lines.append("auth is off: every request runs as tenant 'default'")
    lines += ["Try:", f"  curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\",
              f"    -d '{{\"model\": \"{state.model_name}\", \"messages\": [{{\"role\": \"user\", "
              f"\"content\": \"Say hello in French.\"}}], \"max_tokens\": 32}}'"]
    print("\n".join(lines), flush=True)
    config = uvicorn.Config(app, host=s.host, port=s.port, log_level=s.log_level, timeout_graceful_shutdown=5,
                            timeout_keep_alive=5)
    DrainingServer(config, state).run()
    return 0
