"""The bridge between HTTP handlers (asyncio) and the engine (its own thread): submitting
the engine requests behind one HTTP request (one per choice), carrying their output onto
the event loop, and cleaning up exactly once however the HTTP request ends."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from functools import partial

import anyio
from fastapi import Request, Response
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llmos.api.handle import RequestHandle
from llmos.outputs import RequestOutput, StreamDelta
from llmos.sampling_params import SamplingParams
from llmos.server.auth import Principal
from llmos.server.limits import Permit
from llmos.server.state import ServerState

Event = tuple[int, StreamDelta | RequestOutput | Exception]
Jobs = list[tuple[list[int], SamplingParams]]   # (prompt token ids, params), one per engine request


class Generation:
    """One HTTP request's engine requests. Their deltas arrive on `events()` as (choice index,
    delta); each choice ends with its RequestOutput (or the exception that failed it)."""

    def __init__(self, state: ServerState, permit: Permit, handles: list[RequestHandle]) -> None:
        self.state, self.permit, self.handles = state, permit, handles
        self.outputs: list[RequestOutput | None] = [None] * len(handles)
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._remaining = len(handles)
        self._closed = False
        for i, h in enumerate(handles):
            threading.Thread(target=self._forward, args=(i, h), name=f"llmos-forward-{h.request_id}",
                             daemon=True).start()

    def _forward(self, index: int, handle: RequestHandle) -> None:
        # The engine's handles block; one thread per choice turns them into loop events.
        try:
            for delta in handle:
                self._put((index, delta))
            self._put((index, handle.result()))
        except Exception as e:
            self._put((index, e))

    def _put(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:   # the loop has closed: the server is gone, nobody is listening
            pass

    async def events(self) -> AsyncIterator[Event]:
        while self._remaining:
            index, item = await self._queue.get()
            if not isinstance(item, StreamDelta):
                self._remaining -= 1
                if isinstance(item, RequestOutput):
                    self.outputs[index] = item
            yield index, item

    async def wait(self) -> list[RequestOutput]:
        """Every choice's output; raises the first failure."""
        failure = None
        async for _, item in self.events():
            if isinstance(item, Exception) and failure is None:
                failure = item
        if failure is not None:
            raise failure
        return self.outputs

    async def wait_or_disconnect(self, request: Request) -> list[RequestOutput] | None:
        """Like wait(), but a client that hangs up cancels the generation (None is returned)."""
        done_task = asyncio.ensure_future(self.wait())
        gone_task = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await asyncio.wait({done_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone_task.cancel()
        if not done_task.done():
            done_task.cancel()
            self.close()
            return None
        return done_task.result()

    def close(self) -> None:
        """Cancel what still runs, give back the limits and the drain slot. Idempotent."""
        if self._closed:
            return
        self._closed = True
        unfinished = [h for h in self.handles if not h.done]
        if unfinished:   # cancelling takes the engine lock; never block the event loop on it
            threading.Thread(target=lambda: [h.cancel() for h in unfinished], daemon=True).start()
        self.permit.release(sum(len(o.token_ids) for o in self.outputs if o is not None))
        self.state.drain.leave()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def submit(state: ServerState, principal: Principal, base_id: str, jobs: Jobs,
           priority: int, user: str | None, adapter: str | None = None) -> list[RequestHandle]:
    """Queue one engine request per (prompt ids, params), ids base_id-0, base_id-1, ...,
    each through the LoRA `adapter` if one is named. All or none: if one is refused,
    those already queued are cancelled. Blocking."""
    state.set_weight(principal.tenant, principal.weight)
    handles: list[RequestHandle] = []
    try:
        for i, (ids, params) in enumerate(jobs):
            handles.append(state.llm.submit(ids, params, tenant=principal.tenant, priority=priority,
                                             request_id=f"{base_id}-{i}", user=user, adapter=adapter))
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return handles


async def start(state: ServerState, principal: Principal, permit: Permit, base_id: str,
                jobs: Jobs, priority: int, user: str | None, adapter: str | None = None) -> Generation:
    """Submit off the event loop and start carrying output. On failure the permit and the
    drain slot are given back before the error propagates."""
    try:
        handles = await anyio.to_thread.run_sync(submit, state, principal, base_id, jobs, priority, user, adapter,
                                                 limiter=state.submit_limiter)
    except BaseException:
        permit.release()
        state.drain.leave()
        raise
    return Generation(state, permit, handles)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


async def serve_generation(state: ServerState, request: Request, principal: Principal, body, *, id_prefix: str,
                           prepare: Callable[[], tuple[Jobs, int]],
                           stream: Callable[[Generation, str, int], AsyncIterator[str]],
                           respond: Callable[[list[RequestOutput], str, int], object], adapter: str | None = None):
    """What every generation route does: take a drain slot, build the engine jobs and count
    the prompt tokens off the event loop (`prepare`), pass the rate limits, submit, then
    either stream events (`stream(gen, id, created)`) or wait and answer
    (`respond(outputs, id, created)`). A client that hangs up cancels its generation.
    `adapter`: the LoRA adapter the model name chose (common.check_model)."""
    priority = principal.priority(body.priority)
    state.drain.admit()
    try:
        jobs, prompt_tokens = await anyio.to_thread.run_sync(prepare)
        permit = state.limiter.admit(principal.key, prompt_tokens)
    except BaseException:
        state.drain.leave()
        raise
    rid = new_id(id_prefix)
    gen = await start(state, principal, permit, rid, jobs, priority, body.user, adapter)
    created = int(time.time())
    if body.stream:
        return EventStream(stream(gen, rid, created), gen.close, headers={"X-Request-Id": rid})
    try:
        outputs = await gen.wait_or_disconnect(request)
    finally:
        gen.close()
    if outputs is None:   # the client hung up; nobody reads this
        return Response(status_code=499)
    return respond(outputs, rid, created)


class EventStream(StreamingResponse):
    """Server-sent events that notice a client hanging up even while no token is due (a
    queued or suspended request) and always run `on_close`, whichever way the stream ends."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None], headers: dict | None = None) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", **(headers or {})})
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def run_then_stop(fn) -> None:
                    await fn()
                    tg.cancel_scope.cancel()

                tg.start_soon(run_then_stop, partial(self.stream_response, send))
                await run_then_stop(partial(_disconnected, receive))
        except OSError:   # the client went away mid-write
            pass
        finally:
            self._on_close()
            with anyio.CancelScope(shield=True):
                await self._events.aclose()


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"
