"""What the agent kernel needs of the LLM, served by the `LLM` facade: an agent's LLM call
is an ordinary kernel request carrying the process's tenant, priority, weight and pid, so
scheduling, preemption and swapping apply to agents unchanged, and a process's requests
can be suspended, reniced or cancelled with it."""

from __future__ import annotations

import dataclasses

from llmos.api.llm import LLM
from llmos.errors import InvalidRequestError
from llmos.kernel.process import Process
from llmos.sampling_params import SamplingParams
from llmos.server.embeddings import Embedder

_SAMPLING = {f.name for f in dataclasses.fields(SamplingParams)} - {"guided"}


class ProcessLLM:
    def __init__(self, llm: LLM, embedder: Embedder) -> None:
        self.llm = llm
        self.embedder = embedder

    def generate(self, proc: Process, prompt: str | list[dict], sampling: dict) -> dict:
        unknown = sorted(set(sampling) - _SAMPLING)
        if unknown:
            raise InvalidRequestError(f"sampling: unknown field(s) {unknown}; known: {sorted(_SAMPLING)}")
        params = SamplingParams(**{"max_tokens": 256, **sampling})
        handle = self.llm.submit(prompt, params, tenant=proc.tenant, priority=proc.priority, owner_pid=proc.pid,
                                 weight=proc.weight, kv_quota=proc.limits.kv_quota)
        out = handle.result()
        return {"text": out.text, "finish_reason": out.finish_reason, "prompt_tokens": len(out.prompt_token_ids),
                "output_tokens": len(out.token_ids)}

    def embed(self, texts: list[str]) -> list[list[float]]:
        return self.embedder.embed(texts).tolist()

    def cancel(self, pid: int) -> None:
        for h in self.llm.requests_of(pid):
            h.cancel()

    def suspend(self, pid: int) -> None:
        for h in self.llm.requests_of(pid):
            h.suspend()

    def resume(self, pid: int) -> None:
        for h in self.llm.requests_of(pid):
            h.resume()

    def renice(self, pid: int, priority: int, weight: float) -> None:
        for h in self.llm.requests_of(pid):
            h.set_priority(priority, weight)
