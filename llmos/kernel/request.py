"""A request's control block (`Sequence`): its tokens, its place in the KV pool, its
scheduling state; and `RequestTable`, the one table of live requests.

Requests are the kernel's unit of LLM work, as threads are a Unix kernel's unit of CPU
work; agent processes (`llmos.kernel.process`) own requests, as processes own threads.
Everyone who needs to find a request by id — the engine, the engine thread, the server's
kernel API — reads this one table.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from llmos.outputs import RequestMetrics, RequestOutput, StreamDelta, TokenLogprob
from llmos.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch


class SequenceStatus(enum.Enum):
    WAITING = "waiting"        # queued, holds no blocks (new, or preempted by recompute)
    RUNNING = "running"        # in the batch, holds blocks in the pool
    SWAPPED = "swapped"        # preempted by swap: its KV lives in the swap tier
    SUSPENDED = "suspended"    # paused by its owner; holds nothing in the pool
    FINISHED = "finished"


class Listener(Protocol):
    """Who hears a request's output: the API layer's handle, as a callback interface so the
    engine needs to know nothing about its callers."""

    def attach(self, seq: Sequence) -> None: ...

    def push(self, delta: StreamDelta) -> None: ...

    def finish(self, output: RequestOutput | None, error: Exception | None = None) -> None: ...


@dataclass
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    tenant: str = "default"
    priority: int = 0
    # Fair share inside a tenant: requests of one group (an agent process) share the
    # tenant's part with the tenant's other groups by `weight`.
    group: str | None = None
    weight: float = 1.0
    group_kv_quota: int | None = None  # KV blocks the group's running requests may hold at once
    owner_pid: int | None = None      # the agent process that made this request, if any
    user: str | None = None           # the end user the caller named (OpenAI's `user`)
    adapter: str | None = None        # the LoRA adapter its tokens run through, by name
    adapter_id: int | None = None     # that adapter's registration (kernel.adapters); seeds its prefix hashes
    created: int = field(default_factory=lambda: int(time.time()))
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_text: str = ""
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0      # tokens whose KV is in the pool
    num_cached_tokens: int = 0        # of those, how many came from the prefix cache
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    metrics: RequestMetrics | None = None
    seq_no: int = 0                   # admission order, the final tie-breaker everywhere
    swapped_tokens: int = 0           # computed tokens whose KV sits in the swap tier
    rr_stamp: int = 0                 # round-robin position (lower goes first)
    quantum_used: int = 0
    wait_since: float | None = None   # when it last started waiting (None while running)
    wait_accum: float = 0.0           # seconds spent waiting before that
    io: Any = None                    # the engine's output state (detokenizer, stop strings, grammar)
    listener: Listener | None = None

    def __post_init__(self) -> None:
        self.wait_since = self.arrival_time
        if self.metrics is None:
            self.metrics = RequestMetrics(arrival_time=time.time())
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def fair_key(self) -> str:
        """The fair-share unit inside the tenant: the owning group, else the request itself."""
        return self.group if self.group is not None else f"req:{self.request_id}"

    def waited(self, now: float) -> float:
        """Seconds spent waiting for the machine (queued or preempted), which is what ages it."""
        return self.wait_accum + (now - self.wait_since if self.wait_since is not None else 0.0)

    def start_waiting(self, now: float) -> None:
        if self.wait_since is None:
            self.wait_since = now

    def stop_waiting(self, now: float) -> None:
        if self.wait_since is not None:
            self.wait_accum += now - self.wait_since
            self.wait_since = None

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, self.output_text,
                             list(self.output_token_ids), self.is_finished, self.finish_reason, self.metrics,
                             self.logprobs, self.stop_reason)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int            # tokens to compute this step, starting at seq.num_computed_tokens
    # Whether this step finishes the sequence's known tokens, so a next token is due. Fixed
    # when scheduled: after the step has advanced the sequence it could no longer be told.
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.seq.num_computed_tokens + self.num_new_tokens == len(self.seq)

    @property
    def is_prefill(self) -> bool:
        """Whether this step computes prompt (or recomputed) tokens rather than one decode."""
        return self.num_new_tokens > 1 or not self.samples


@dataclass
class RequestInfo:
    """A live request as callers outside the engine see it."""
    request_id: str
    tenant: str
    priority: int
    state: str
    prompt_tokens: int
    output_tokens: int
    kv_blocks: int
    owner_pid: int | None
    user: str | None
    created: int
    waiting_s: float = 0.0     # seconds spent queued (waiting or swapped out) so far
    adapter: str | None = None  # the LoRA adapter it runs with
    replica: int | None = None  # in a cluster, the engine replica that holds it

    @classmethod
    def of(cls, seq: Sequence) -> RequestInfo:
        return cls(seq.request_id, seq.tenant, seq.priority, seq.status.value, seq.num_prompt_tokens,
                   len(seq.output_token_ids), len(seq.block_table), seq.owner_pid, seq.user, seq.created,
                   round(seq.waited(time.monotonic()), 3), seq.adapter)


class RequestTable:
    """Live requests by id. Written by the engine (under the engine lock), read from any
    thread: a lock keeps the dict consistent, and a row's fields are plain values."""

    def __init__(self) -> None:
        self._seqs: dict[str, Sequence] = {}
        self._lock = threading.Lock()

    def add(self, seq: Sequence) -> None:
        with self._lock:
            self._seqs[seq.request_id] = seq

    def remove(self, request_id: str) -> None:
        with self._lock:
            self._seqs.pop(request_id, None)

    def get(self, request_id: str) -> Sequence | None:
        with self._lock:
            return self._seqs.get(request_id)

    def __contains__(self, request_id: str) -> bool:
        return self.get(request_id) is not None

    def __len__(self) -> int:
        return len(self._seqs)

    def __bool__(self) -> bool:
        return bool(self._seqs)

    def all(self) -> list[Sequence]:
        with self._lock:
            return list(self._seqs.values())

    def of_process(self, pid: int) -> list[Sequence]:
        return [s for s in self.all() if s.owner_pid == pid]
