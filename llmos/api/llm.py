"""The vLLM-style Python entry point: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence as Seq

from llmos.config import EngineConfig
from llmos.engine.llm_engine import LLMEngine
from llmos.errors import InvalidRequestError
from llmos.outputs import RequestOutput, StreamDelta
from llmos.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "smollm2-135m", *, kv_cache_memory: int | str = "1GiB", block_size: int = 16,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, enable_prefix_caching: bool = True,
                 device: str = "auto", dtype: str = "float32", max_model_len: int | None = None, seed: int = 0,
                 num_threads: int | None = None) -> None:
        self.config = EngineConfig(model=model, kv_cache_memory=kv_cache_memory, block_size=block_size,
                                   max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                   enable_prefix_caching=enable_prefix_caching, device=device, dtype=dtype,
                                   max_model_len=max_model_len, seed=seed, num_threads=num_threads)
        self.engine = LLMEngine(self.config)

    def get_tokenizer(self):
        return self.engine.tokenizer

    @staticmethod
    def _per_request(params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n or not all(isinstance(p, SamplingParams) for p in params):
            raise InvalidRequestError(
                f"sampling_params: expected one SamplingParams or a list of {n}, got {len(params)} items")
        return params

    def _run(self, prompts: list, params: SamplingParams | Seq[SamplingParams] | None) -> list[RequestOutput]:
        plist = self._per_request(params, len(prompts))
        seqs = []
        try:
            for p, sp in zip(prompts, plist):
                seqs.append(self.engine.add_request(p, sp))
        except Exception:
            for s in seqs:
                self.engine.abort_request(s.request_id)
            raise
        while any(not s.is_finished for s in seqs):
            self.engine.step()
        return [self.engine.output(s) for s in seqs]

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Completes each prompt (a string or a list of token ids); all run in one batch."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, list):
            raise InvalidRequestError(f"prompts: expected a string or a list, got {type(prompts).__name__}")
        return self._run(prompts, sampling_params)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Answers each conversation (a list of {"role", "content"} messages) with the model's chat template."""
        if isinstance(messages, list) and messages and isinstance(messages[0], dict):
            messages = [messages]
        if not isinstance(messages, list) or not all(isinstance(c, list) and c and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content", ""), str)
                for m in c) for c in messages):
            raise InvalidRequestError("messages: expected a list of {'role': str, 'content': str} messages "
                                      "or a list of such conversations")
        return self._run(messages, sampling_params)

    def stream(self, prompt: str | list[int] | list[dict], sampling_params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yields one request's output as it is produced: text deltas that never split a
        character or show part of a stop string; the last one has finished=True."""
        seq = self.engine.add_request(prompt, sampling_params)
        try:
            while True:
                for d in self.engine.step():
                    if d.request_id == seq.request_id:
                        yield d
                        if d.finished:
                            return
        finally:
            self.engine.abort_request(seq.request_id)
