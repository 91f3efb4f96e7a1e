"""POST /v1/chat/completions: chat, streaming or not, with structured output and tools."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from llmos.outputs import StreamDelta
from llmos.server.auth import Principal, authenticate, get_state
from llmos.server.errors import bad_request, error_body
from llmos.server.generation import Generation, serve_generation, sse
from llmos.server.logprobs import chat_logprobs
from llmos.server.prompts import chat_prompt, response_format_spec, sampling_params
from llmos.server.routers.common import GENERATION_ERRORS, check_model, event_stream
from llmos.server.schemas.openai import (AssistantMessage, AssistantTurn, ChatChoice, ChatChunkChoice, ChatCompletion,
                                         ChatCompletionChunk, ChatCompletionRequest, ChatDelta, FunctionDef,
                                         LlmosTool, NamedToolChoice, Tool, Usage)
from llmos.server.agents import run_chat
from llmos.server.routers.library import call_tool_audited
from llmos.server.tools import call_text, new_call_id
from llmos.tools import loop
from llmos.server.state import ServerState
from llmos.server.tools import CallStream, ToolPlan, parse_call, plan

router = APIRouter(tags=["openai"])


@router.post("/v1/chat/completions", response_model=ChatCompletion,
             responses={200: {"content": event_stream(ChatCompletionChunk)}, **GENERATION_ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request, principal: Principal = Depends(authenticate),
                           state: ServerState = Depends(get_state)):
    adapter = check_model(state, body.model)
    if adapter is not None and body.llmos_execute:
        raise bad_request("llmos_execute: the server-side tool loop runs the base model; drop the adapter "
                          "from `model` or run the loop on the client", "llmos_execute")
    if body.tools and any(isinstance(t, LlmosTool) for t in body.tools):
        library_tools = [state.agents.library.get(t.name) if isinstance(t, LlmosTool) else None for t in body.tools]
        if body.llmos_execute:
            return JSONResponse(await _execute_limited(state, principal, body, library_tools))
        body.tools = [_function(t) if lt is None else _function(lt) for t, lt in zip(body.tools, library_tools)]
    tools = plan(body.tools, body.tool_choice)
    guided = tools.guided if tools else response_format_spec(body.response_format)
    tokenizer = state.llm.get_tokenizer()
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    prompt_len = 0

    def prepare():
        nonlocal prompt_len
        ids = chat_prompt(tokenizer, body.messages, tools)
        prompt_len = len(ids)
        params = [sampling_params(body, max_tokens=body.max_completion_tokens or body.max_tokens, prompt_len=len(ids),
                                  max_model_len=state.llm.max_model_len,
                                  default_max_tokens=state.settings.server.default_max_tokens, logprobs=logprobs,
                                  guided=guided, choice=i) for i in range(body.n)]
        return [(ids, p) for p in params], len(ids)

    def stream(gen: Generation, cid: str, created: int):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _events(gen, cid, created, body.model, prompt_len, tools, include_usage, logprobs is not None)

    def respond(outputs, cid: str, created: int) -> ChatCompletion:
        choices = []
        for i, out in enumerate(outputs):
            call = parse_call(out.text) if tools else None
            message = AssistantMessage(content=None, tool_calls=[call]) if call else AssistantMessage(content=out.text)
            finish = "tool_calls" if call and out.finish_reason == "stop" else out.finish_reason
            choices.append(ChatChoice(index=i, message=message, finish_reason=finish,
                                      logprobs=chat_logprobs(out.logprobs) if logprobs is not None else None))
        return ChatCompletion(id=cid, created=created, model=body.model, choices=choices,
                              usage=Usage.of(prompt_len, outputs))

    return await serve_generation(state, request, principal, body, id_prefix="chatcmpl", prepare=prepare,
                                  stream=stream, respond=respond, adapter=adapter)


async def _events(gen: Generation, cid: str, created: int, model: str, prompt_tokens: int,
                  tools: ToolPlan | None, include_usage: bool, logprobs: bool) -> AsyncIterator[str]:
    def chunk(index: int, delta: ChatDelta, finish: str | None = None, lp=None) -> str:
        c = ChatCompletionChunk(id=cid, created=created, model=model, choices=[
            ChatChunkChoice(index=index, delta=delta, logprobs=lp, finish_reason=finish)])
        data = c.model_dump(mode="json", exclude_none=True)
        data["choices"][0].update(logprobs=lp and data["choices"][0]["logprobs"], finish_reason=finish)
        if include_usage:
            data["usage"] = None
        return sse(json.dumps(data, ensure_ascii=False))

    n = len(gen.handles)
    calls = [CallStream(tools) if tools else None for _ in range(n)]
    for i in range(n):
        yield chunk(i, ChatDelta(role="assistant", content=""))
    async for index, item in gen.events():
        if isinstance(item, Exception):
            yield sse(json.dumps(error_body(item)))
            continue
        if not isinstance(item, StreamDelta):
            continue
        content, call_deltas = calls[index].feed(item.text) if calls[index] else (item.text, [])
        lp = chat_logprobs(item.logprobs) if logprobs and item.logprobs else None
        if content or call_deltas or lp:
            yield chunk(index, ChatDelta(content=content or None, tool_calls=call_deltas or None), lp=lp)
        if item.finished:
            finish = item.finish_reason
            if calls[index]:
                rest = calls[index].finish()
                if rest:
                    yield chunk(index, ChatDelta(tool_calls=rest))
                if calls[index].called and finish == "stop":
                    finish = "tool_calls"
            yield chunk(index, ChatDelta(), finish)
    if include_usage:
        usage = ChatCompletionChunk(id=cid, created=created, model=model, choices=[],
                                    usage=Usage.of(prompt_tokens, gen.outputs))
        yield sse(usage.model_dump_json())
    yield sse("[DONE]")


def _function(t) -> Tool:
    """A library tool as the OpenAI function definition a client would have written."""
    if isinstance(t, Tool):
        return t
    return Tool(type="function", function=FunctionDef(name=t.function_name, description=t.description,
                                                      parameters=t.parameters))


async def _execute_limited(state: ServerState, principal: Principal, body: ChatCompletionRequest, tools) -> dict:
    """The tool loop under the same drain, rate limits and priority rules as any generation."""
    priority = principal.priority(body.priority)
    state.drain.admit()
    try:
        prompt_tokens = sum(len(m.text() or "") for m in body.messages) // 4 + 1   # a first estimate for tpm
        permit = state.limiter.admit(principal.key, prompt_tokens)
        try:
            out = await anyio.to_thread.run_sync(execute, state, principal, body, tools, priority)
        except BaseException:
            permit.release(0)
            raise
        permit.release(out["usage"]["completion_tokens"])
        return out
    finally:
        state.drain.leave()


def execute(state: ServerState, principal: Principal, body: ChatCompletionRequest, tools, priority: int = 0) -> dict:
    """llmos_execute: the server runs the model -> tool -> model loop with the key's
    tenant and returns the final answer as a chat completion, plus `llmos_trace`. Blocking."""
    messages = []
    for m in body.messages:
        content = m.text() or ""
        if isinstance(m, AssistantTurn) and m.tool_calls:
            content = "\n".join([content, *(call_text(c) for c in m.tool_calls)]).strip()
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    sampling = {k: v for k, v in (("max_tokens", body.max_completion_tokens or body.max_tokens),
                                  ("temperature", body.temperature), ("top_p", body.top_p), ("seed", body.seed))
                if v is not None}
    state.set_weight(principal.tenant, principal.weight)

    def generate(msgs, specs, choice):
        out = run_chat(state.llm, msgs, sampling, tools=specs or None, tool_choice=choice, tenant=principal.tenant,
                       priority=priority)
        return loop.TurnOutput(out["text"], out["tool_call"], out["prompt_tokens"], out["output_tokens"],
                               out["finish_reason"])

    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        choice = choice.function.name
    result = loop.run(generate, lambda name, args: call_tool_audited(state, principal.tenant, name, args)["result"],
                      messages, tools, max_turns=body.llmos_max_turns, tool_choice=choice or "auto")
    return {"id": "chatcmpl-" + new_call_id()[5:], "object": "chat.completion", "created": int(time.time()),
            "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.output_tokens,
                      "total_tokens": result.prompt_tokens + result.output_tokens},
            "llmos_trace": result.trace, "llmos_turns": result.turns}
