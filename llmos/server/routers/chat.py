"""POST /v1/chat/completions: chat, streaming or not, with structured output and tools."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request

from llmos.outputs import StreamDelta
from llmos.server.auth import Principal, authenticate, get_state
from llmos.server.errors import error_body
from llmos.server.generation import Generation, serve_generation, sse
from llmos.server.logprobs import chat_logprobs
from llmos.server.prompts import chat_prompt, response_format_spec, sampling_params
from llmos.server.routers.common import GENERATION_ERRORS, check_model, event_stream
from llmos.server.schemas.openai import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                         ChatCompletionChunk, ChatCompletionRequest, ChatDelta, Usage)
from llmos.server.state import ServerState
from llmos.server.tools import CallStream, ToolPlan, parse_call, plan

router = APIRouter(tags=["openai"])


@router.post("/v1/chat/completions", response_model=ChatCompletion,
             responses={200: {"content": event_stream(ChatCompletionChunk)}, **GENERATION_ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request, principal: Principal = Depends(authenticate),
                           state: ServerState = Depends(get_state)):
    check_model(state, body.model)
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
                                  stream=stream, respond=respond)


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
