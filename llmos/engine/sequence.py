"""A sequence: one request's tokens, its place in the KV pool, and its life cycle."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from llmos.outputs import RequestMetrics, TokenLogprob
from llmos.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"        # queued, holds no blocks (new, or preempted by recompute)
    RUNNING = "running"        # in the batch, holds blocks in the pool
    SWAPPED = "swapped"        # preempted by swap: its KV lives in the swap tier
    SUSPENDED = "suspended"    # paused by its owner; holds nothing in the pool
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    tenant: str = "default"
    priority: int = 0
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


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int            # tokens to compute this step, starting at seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this step finishes the sequence's known tokens, so a next token is due."""
        return self.seq.num_computed_tokens + self.num_new_tokens == len(self.seq)
