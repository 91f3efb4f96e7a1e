"""What a finished or streaming request hands back to its caller."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from llmos.errors import LLMOSError


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    num_swaps: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def inter_token_latency(self) -> float | None:
        """Mean seconds between output tokens after the first."""
        if self.num_output_tokens < 2 or self.first_token_time is None or self.last_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top_logprobs: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None          # "stop" | "length" | "abort" | None while running
    metrics: RequestMetrics
    logprobs: list[TokenLogprob] | None = None
    stop_reason: str | int | None = None   # the stop string or token that ended it


@dataclass
class StreamDelta:
    """One step of a streamed request: text and tokens produced since the last delta."""
    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


class OutputStream:
    """What a request hands its caller over time: deltas to iterate as they come, then one
    output, or the error that ended it. One producer, any number of reading threads.
    Subclasses (the engine's and the cluster's request handles) name the request."""

    request_id: str

    def __init__(self) -> None:
        self._deltas: queue.SimpleQueue[StreamDelta] = queue.SimpleQueue()
        self._done = threading.Event()
        self._output: RequestOutput | None = None
        self._error: Exception | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        if self._error is not None:
            raise LLMOSError(f"request {self.request_id} failed: {self._error}") from self._error
        return self._output

    def __iter__(self) -> Iterator[StreamDelta]:
        while True:
            delta = self._deltas.get()
            yield delta
            if delta.finished:
                return
