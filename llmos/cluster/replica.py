"""One engine replica: an `LLM` (its own weights, KV pool and kernel) inside a Ray actor.

The class is plain Python; `Cluster` turns it into an actor with `ray.remote`, keeping its
name, so operators find `EngineReplica` in `ray list actors` and in process titles
(`ray::EngineReplica`). Each generation streams back as a Ray generator of small events,
so the router sees every token as it is made and knows exactly how far a request got if
this replica dies."""

from __future__ import annotations

import os
import socket
import time

from llmos.kernel.request import RequestInfo
from llmos.kernel.stats import KernelStats, MemoryMap
from llmos.sampling_params import SamplingParams


class EngineReplica:
    def __init__(self, index: int, model: str, settings: dict, threads: int) -> None:
        import torch
        torch.set_num_threads(max(1, threads))
        from llmos.api.llm import LLM
        self.index = index
        self.started = time.time()
        self.llm = LLM(model, **settings)

    def info(self) -> dict:
        """What the router needs to know once: the model, its limits, and its tokenizer."""
        return {"index": self.index, "pid": os.getpid(), "node": socket.gethostname(),
                "model_name": self.llm.model_name, "max_model_len": self.llm.max_model_len,
                "kv_block_bytes": self.llm.kv_block_bytes, "block_size": self.llm.config.block_size,
                "num_blocks": self.llm.engine.kernel.block_manager.num_blocks,
                "tokenizer": self.llm.get_tokenizer().to_json(), "started": self.started}

    def load(self) -> dict:
        """Queue depth and KV use: the router's load signal, polled about once a second."""
        s = self.llm.stats()
        return {"pid": os.getpid(), "running": s.requests.get("running", 0), "waiting": s.requests.get("waiting", 0),
                "kv_used": s.kv_blocks.used, "kv_total": s.kv_blocks.total}

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, labels: dict):
        """Stream one request: ("accepted", pid) first, then ("delta", StreamDelta) per step,
        then ("output", RequestOutput). A bad request raises before "accepted"."""
        handle = self.llm.submit(prompt_ids, params, request_id=request_id, **labels)
        yield ("accepted", os.getpid())
        for delta in handle:
            yield ("delta", delta)
        try:
            yield ("output", handle.result())
        except Exception as e:      # failed in the engine: the router ends the request with it
            yield ("error", str(e))

    def act(self, request_id: str, action: str, *args) -> tuple[bool, str | None]:
        """cancel | suspend | resume | set_priority on one request; (ok, its state now)."""
        handle = self.llm.request(request_id)
        if handle is None:
            return False, None
        ok = getattr(handle, action)(*args)
        return bool(ok), handle.status

    def call(self, method: str, *args, **kwargs):
        """One more LLM method on this replica (adapter management)."""
        return getattr(self.llm, method)(*args, **kwargs)

    def set_tenant(self, name: str, kwargs: dict) -> None:
        self.llm.set_tenant(name, **kwargs)

    def stats(self) -> KernelStats:
        return self.llm.stats()

    def list_requests(self) -> list[RequestInfo]:
        return self.llm.list_requests()

    def memory_map(self) -> MemoryMap:
        return self.llm.memory_map()
