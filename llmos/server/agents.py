"""What the agent kernel needs of the LLM, served by the `LLM` facade: an agent's LLM call
is an ordinary kernel request carrying the process's tenant, priority, weight and pid, so
scheduling, preemption and swapping apply to agents unchanged, and a process's requests
can be suspended, reniced or cancelled with it."""

from __future__ import annotations

import dataclasses
import json

from llmos.api.llm import LLM
from llmos.errors import InvalidRequestError
from llmos.kernel.process import Process
from llmos.sampling_params import SamplingParams
from llmos.server.embeddings import Embedder
from llmos.server.schemas.openai import NamedToolChoice, Tool
from llmos.server.tools import parse_call, plan, system_prompt

_SAMPLING = {f.name for f in dataclasses.fields(SamplingParams)} - {"guided"}


class ProcessLLM:
    def __init__(self, llm: LLM, embedder: Embedder) -> None:
        self.llm = llm
        self.embedder = embedder

    def generate(self, proc: Process, prompt: str | list[dict], sampling: dict, *, tools: list[dict] | None = None,
                 tool_choice=None) -> dict:
        return run_chat(self.llm, prompt, sampling, tools=tools, tool_choice=tool_choice, tenant=proc.tenant,
                        priority=proc.priority, owner_pid=proc.pid, weight=proc.weight, kv_quota=proc.limits.kv_quota)

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


def run_chat(llm: LLM, prompt: str | list[dict], sampling: dict, *, tools: list[dict] | None = None,
             tool_choice=None, **submit) -> dict:
    """One generation for the kernel's tool loop and agents' llm calls: with `tools`
    (OpenAI function definitions) the output may be one call, held to their schemas."""
    unknown = sorted(set(sampling) - _SAMPLING)
    if unknown:
        raise InvalidRequestError(f"sampling: unknown field(s) {unknown}; known: {sorted(_SAMPLING)}")
    guided = None
    tool_plan = None
    if tools and tool_choice != "none":
        choice = NamedToolChoice.model_validate(tool_choice) if isinstance(tool_choice, dict) else tool_choice
        tool_plan = plan([Tool.model_validate({"type": "function", "function": t}) for t in tools], choice)
        prompt = _with_tools(prompt, system_prompt(tool_plan))
        guided = tool_plan.guided
    params = SamplingParams(**{"max_tokens": 256, **sampling, "guided": guided})
    out = llm.submit(prompt, params, **submit).result()
    call = parse_call(out.text) if tool_plan is not None else None
    return {"text": "" if call else out.text, "finish_reason": "tool_calls" if call else out.finish_reason,
            "prompt_tokens": len(out.prompt_token_ids), "output_tokens": len(out.token_ids),
            "tool_call": call and {"name": call.function.name, "arguments": json.loads(call.function.arguments)}}


def _with_tools(prompt: str | list[dict], description: str) -> list[dict]:
    """The conversation with the tools described in its system message (SmolLM2's template
    has no place of its own for them)."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if msgs and msgs[0]["role"] == "system":
        msgs[0]["content"] = f"{msgs[0]['content']}\n\n{description}"
    else:
        msgs.insert(0, {"role": "system", "content": description})
    return msgs
