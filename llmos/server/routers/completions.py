"""POST /v1/completions: plain-text completion of one or many prompts, streaming or not."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request

from llmos.outputs import StreamDelta
from llmos.server.auth import Principal, authenticate, get_state
from llmos.server.errors import error_body
from llmos.server.generation import Generation, serve_generation, sse
from llmos.server.logprobs import completion_logprobs
from llmos.server.prompts import completion_prompts, sampling_params
from llmos.server.routers.common import GENERATION_ERRORS, check_model, event_stream
from llmos.server.schemas.openai import Completion, CompletionChoice, CompletionRequest, Usage
from llmos.server.state import ServerState

router = APIRouter(tags=["openai"])


@router.post("/v1/completions", response_model=Completion,
             responses={200: {"content": event_stream(Completion)}, **GENERATION_ERRORS})
async def completions(body: CompletionRequest, request: Request, principal: Principal = Depends(authenticate),
                      state: ServerState = Depends(get_state)):
    adapter = check_model(state, body.model)
    tokenizer = state.llm.get_tokenizer()
    echoes: list[str] = []
    prompt_tokens = 0

    def prepare():
        nonlocal prompt_tokens
        prompts = completion_prompts(tokenizer, body.prompt)
        jobs = [(ids, sampling_params(body, max_tokens=body.max_tokens, prompt_len=len(ids),
                                      max_model_len=state.llm.max_model_len,
                                      default_max_tokens=state.settings.server.default_max_tokens,
                                      logprobs=body.logprobs, choice=i))
                for ids in prompts for i in range(body.n)]
        echoes.extend(tokenizer.decode(ids) if body.echo else "" for ids in prompts for _ in range(body.n))
        prompt_tokens = sum(len(ids) for ids in prompts)
        return jobs, prompt_tokens

    def stream(gen: Generation, cid: str, created: int):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _events(gen, cid, created, body.model, prompt_tokens, echoes, include_usage, body.logprobs is not None)

    def respond(outputs, cid: str, created: int) -> Completion:
        choices = [CompletionChoice(index=i, text=echoes[i] + out.text, finish_reason=out.finish_reason,
                                    logprobs=completion_logprobs(out.logprobs, len(echoes[i]))
                                    if body.logprobs is not None else None)
                   for i, out in enumerate(outputs)]
        return Completion(id=cid, created=created, model=body.model, choices=choices,
                          usage=Usage.of(prompt_tokens, outputs))

    return await serve_generation(state, request, principal, body, id_prefix="cmpl", prepare=prepare,
                                  stream=stream, respond=respond, adapter=adapter)


async def _events(gen: Generation, cid: str, created: int, model: str, prompt_tokens: int,
                  echoes: list[str], include_usage: bool, logprobs: bool) -> AsyncIterator[str]:
    def chunk(index: int, text: str, finish: str | None = None, lp=None) -> str:
        c = Completion(id=cid, created=created, model=model,
                       choices=[CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=finish)])
        data = c.model_dump(mode="json", exclude={"usage"} if not include_usage else set())
        return sse(json.dumps(data, ensure_ascii=False))

    offsets = [len(e) for e in echoes]
    for i, echo in enumerate(echoes):
        if echo:
            yield chunk(i, echo)
    async for index, item in gen.events():
        if isinstance(item, Exception):
            yield sse(json.dumps(error_body(item)))
            continue
        if not isinstance(item, StreamDelta):
            continue
        lp = completion_logprobs(item.logprobs, offsets[index]) if logprobs and item.logprobs else None
        offsets[index] += len(item.text)
        if item.text or lp or item.finished:
            yield chunk(index, item.text, item.finish_reason if item.finished else None, lp)
    if include_usage:
        usage = Completion(id=cid, created=created, model=model, choices=[], usage=Usage.of(prompt_tokens, gen.outputs))
        yield sse(usage.model_dump_json())
    yield sse("[DONE]")
