"""Per-request sampling settings, validated once at the API boundary (vLLM's names)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmos.errors import InvalidRequestError


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
    # {"regex": "..."} or {"grammar": "<EBNF>"}; compiled by llmos.engine.guided.
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

        def num(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad(name, "must be a number")
            return v

        def integer(name: str) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(name, "must be an integer")
            return v

        if integer("max_tokens") < 1:
            raise bad("max_tokens", "must be at least 1")
        if not 0.0 <= num("temperature") <= 100.0:
            raise bad("temperature", "must be between 0 and 100")
        if integer("top_k") < 0:
            raise bad("top_k", "must be 0 or -1 (off) or a positive integer")
        if not 0.0 < num("top_p") <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        self.top_p = max(self.top_p, 1e-6)   # a nucleus below that is the top token anyway
        if not 0.0 <= num("min_p") <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if not 0.01 <= num("repetition_penalty") <= 10.0:
            raise bad("repetition_penalty", "must be in [0.01, 10]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= num(name) <= 2.0:
                raise bad(name, "must be between -2 and 2")
        if self.seed is not None:
            integer("seed")
        if self.logprobs is not None and not 0 <= integer("logprobs") <= 20:
            raise bad("logprobs", "must be between 0 and 20")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if len(self.stop) > 16:
            raise bad("stop", "at most 16 stop strings")
        if self.guided is not None and (not isinstance(self.guided, dict) or len(self.guided) != 1 or
                                        next(iter(self.guided)) not in ("json_object", "json_schema", "regex", "grammar")):
            raise bad("guided", "must be one of {'json_object': True}, {'json_schema': ...}, {'regex': ...}, "
                                "{'grammar': ...}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5
