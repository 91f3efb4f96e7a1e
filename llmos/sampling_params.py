"""Per-request sampling settings, validated once at the API boundary (vLLM's names)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmos.errors import InvalidRequestError
from llmos.validate import integer, number

GUIDED_KINDS = ("json_object", "json_schema", "text_or_json_schema", "regex", "grammar")
# A nucleus this small is the top token anyway; smaller values would underflow the sampler.
MIN_TOP_P = 1e-6


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0                   # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None      # number of top logprobs to return per token
    include_stop_str_in_output: bool = False
    # Grammar-constrained decoding: {"json_object": True}, {"json_schema": {...}},
    # {"text_or_json_schema": {...}}, {"regex": "..."} or {"grammar": "<EBNF>"};
    # compiled by llmos.engine.guided, unbounded JSON numbers and strings bounded.
    guided: dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._check()

    def _check(self) -> None:
        def bad(name: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name}: {why}, got {getattr(self, name)!r}")

        integer("max_tokens", self.max_tokens, 1)
        number("temperature", self.temperature, 0, 100)
        if integer("top_k", self.top_k) < 0:
            raise bad("top_k", "must be 0 or -1 (off) or a positive integer")
        number("top_p", self.top_p, 0, 1, lo_open=True)
        self.top_p = max(self.top_p, MIN_TOP_P)
        number("min_p", self.min_p, 0, 1)
        number("repetition_penalty", self.repetition_penalty, 0.01, 10)
        for name in ("presence_penalty", "frequency_penalty"):
            number(name, getattr(self, name), -2, 2)
        if self.seed is not None:
            integer("seed", self.seed)
        if self.logprobs is not None:
            integer("logprobs", self.logprobs, 0, 20)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if len(self.stop) > 16:
            raise bad("stop", "at most 16 stop strings")
        if self.guided is not None and (not isinstance(self.guided, dict) or len(self.guided) != 1 or
                                        next(iter(self.guided)) not in GUIDED_KINDS):
            raise bad("guided", "must be one of {'json_object': True}, {'json_schema': ...}, "
                                "{'text_or_json_schema': ...}, {'regex': ...}, {'grammar': ...}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5
