"""The engine: turns requests into token ids, and once per step runs the kernel's batch
through the model — schedule -> execute -> sample -> postprocess — turning sampled tokens
into text, stop decisions and finished outputs. Tenants, queues, preemption and accounting
are the kernel's (`llmos.kernel.Kernel`); the engine only computes."""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field

import torch

from llmos.config import EngineConfig
from llmos.engine.detokenizer import IncrementalDetokenizer, StopChecker
from llmos.engine.lora import LoraWeights
from llmos.engine.model_runner import ModelRunner, kv_bytes_per_block
from llmos.engine.sampler import SampledToken, Sampler, SamplingRow, make_generator
from llmos.errors import InvalidRequestError, ModelLoadError, PromptTooLongError
from llmos.kernel.adapters import Adapter, AdapterInfo
from llmos.kernel.kernel import Kernel
from llmos.kernel.request import ScheduledSeq, Sequence
from llmos.models.loader import load_model
from llmos.models.lora_loader import LoraCheckpoint, load_lora
from llmos.outputs import StreamDelta, TokenLogprob
from llmos.sampling_params import SamplingParams


@dataclass
class PreparedRequest:
    """A request validated and tokenized, its grammar compiled: all the work that needs no
    engine state, so callers do it on their own threads."""
    prompt: str | None
    token_ids: list[int]
    params: SamplingParams
    grammar: object | None = None        # a llmos.engine.guided.CompiledGuide
    adapter_weights: LoraWeights | None = None   # its adapter read back from disk, when it had been evicted


@dataclass
class OutputState:
    """The engine's per-request output state (a Sequence's `io`)."""
    detok: IncrementalDetokenizer
    stop: StopChecker
    guide: object | None = None          # a llmos.engine.guided.Guide when the output is constrained
    deltas: list[StreamDelta] = field(default_factory=list)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        loaded = load_model(config.model, packed=config.compute != "float32" or config.quantization is not None)
        self.model_name = loaded.name
        self.model_config = cfg = loaded.config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.runner = ModelRunner(cfg, loaded.weights, block_size=config.block_size,
                                  kv_cache_memory=config.kv_cache_memory, max_model_len=self.max_model_len,
                                  device=config.device, dtype=config.dtype, decode_dtype=config.decode_dtype,
                                  compute=config.compute, quantization=config.quantization,
                                  packed_activations=config.packed_activations, requantize=loaded.quantized)
        del loaded
        self.kernel = Kernel(config, num_blocks=self.runner.num_blocks,
                             bytes_per_block=kv_bytes_per_block(cfg, config.block_size, self.runner.dtype),
                             read_blocks=self.runner.read_blocks, write_blocks=self.runner.write_blocks)
        self.requests = self.kernel.requests
        self.scheduler = self.kernel.scheduler
        self.block_manager = self.kernel.block_manager
        self.tenants = self.kernel.tenants
        self.sampler = Sampler()
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.eos_token_ids = set(self.tokenizer.eos_token_ids)

    @property
    def num_steps(self) -> int:
        return self.kernel.accounting.num_steps

    # -- requests --------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int] | list[dict]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            return self.tokenizer.encode_chat(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not prompt:
                raise InvalidRequestError("prompt: must not be empty")
            bad = [t for t in prompt if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise InvalidRequestError(f"prompt: token ids must be in [0, {self.model_config.vocab_size}), got {bad[:5]}")
            return None, list(prompt)
        raise InvalidRequestError(
            f"prompt: expected a string, a list of token ids or a list of chat messages, got {type(prompt).__name__}")

    def prepare_request(self, prompt: str | list[int] | list[dict], params: SamplingParams | None = None, *,
                        adapter: str | None = None, tenant: str = "default") -> PreparedRequest:
        """Validation, tokenization and grammar compilation, and reading back an evicted
        adapter; safe on any thread."""
        weights = self._adapter_for(adapter, tenant) if adapter is not None else None
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params: expected SamplingParams, got {type(params).__name__}")
        text, ids = self.encode_prompt(prompt)
        if not ids:
            raise InvalidRequestError("prompt: encodes to zero tokens")
        self.check_fits(len(ids), params.max_tokens)
        grammar = None
        if params.guided is not None:
            from llmos.engine.guided import JsonBounds, compile_guide
            bounds = JsonBounds(self.config.json_max_digits, self.config.json_max_string_length)
            grammar = compile_guide(params.guided, self.tokenizer, bounds)   # a bad schema fails here
        return PreparedRequest(text, ids, params, grammar, weights)

    def add_request(self, prompt: str | list[int] | list[dict] | None = None, params: SamplingParams | None = None, *,
                    request_id: str | None = None, tenant: str = "default", priority: int = 0,
                    prepared: PreparedRequest | None = None, adapter: str | None = None, **labels) -> Sequence:
        """Queue a request, through the LoRA `adapter` if one is named; `labels` are
        Sequence fields naming its owner (group, weight, owner_pid, user). Returns its
        control block."""
        p = prepared or self.prepare_request(prompt, params, adapter=adapter, tenant=tenant)
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise InvalidRequestError(f"request_id: {rid!r} is already in use")
        if adapter is not None:
            self._make_resident(adapter, p.adapter_weights)
        seq = Sequence(rid, p.prompt, p.token_ids, p.params, make_generator(p.params.seed, self._rng.getrandbits(63)),
                       tenant=tenant, priority=priority, adapter=adapter, **labels)
        seq.io = OutputState(IncrementalDetokenizer(self.tokenizer, p.token_ids),
                             StopChecker(p.params.stop, p.params.include_stop_str_in_output),
                             p.grammar.new_guide() if p.grammar is not None else None)
        self.kernel.admit(seq)
        return seq

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        total = prompt_len + max_tokens
        if total > self.max_model_len:
            raise PromptTooLongError(
                f"prompt: {prompt_len} prompt tokens + max_tokens {max_tokens} = {total} exceeds the model's "
                f"context length of {self.max_model_len} tokens")
        capacity = self.block_manager.num_blocks * self.config.block_size
        if total > capacity:
            raise PromptTooLongError(
                f"prompt: {prompt_len} prompt tokens + max_tokens {max_tokens} = {total} can never fit the KV "
                f"cache of {capacity} tokens (kv_cache_memory={self.config.kv_cache_memory} bytes)")

    # -- LoRA adapters: the kernel keeps the table and the budget, the runner the weights ----
    def read_adapter(self, path: str) -> tuple[LoraCheckpoint, LoraWeights]:
        """An adapter file read, checked against the model and laid out for the engine;
        touches no engine state, so callers do it on their own threads."""
        ckpt = load_lora(path, self.model_config, self.config.max_lora_rank)
        return ckpt, LoraWeights(ckpt, self.model_config, self.runner.device, self.runner.dtype)

    def add_adapter(self, name: str, ckpt: LoraCheckpoint, weights: LoraWeights,
                    tenants: list[str] | None = None) -> AdapterInfo:
        """Register and make resident an adapter read by read_adapter; idle adapters may be
        evicted to make room. `tenants`: who may use it (None: everyone)."""
        row = Adapter(name, str(ckpt.path.resolve()), ckpt.format, ckpt.rank, ckpt.alpha, ckpt.targets,
                      weights.nbytes, frozenset(tenants) if tenants is not None else None)
        self._evict(self.kernel.adapters.register(row))
        self.runner.lora.add(name, weights)
        return AdapterInfo.of(row)

    def remove_adapter(self, name: str) -> None:
        self.kernel.adapters.remove(name)
        self.runner.lora.drop(name)

    def _adapter_for(self, name: str, tenant: str) -> LoraWeights | None:
        """Checks the tenant may use the adapter; its weights read back if it was evicted."""
        if not isinstance(name, str):
            raise InvalidRequestError(f"adapter: expected an adapter name, got {type(name).__name__}")
        row = self.kernel.adapters.check(name, tenant)
        return None if row.resident else self._read_back(row)

    def _read_back(self, row: Adapter) -> LoraWeights:
        try:
            return self.read_adapter(row.path)[1]
        except ModelLoadError as e:
            raise InvalidRequestError(f"adapter: {row.name!r} was evicted and cannot be read back: {e}") from None

    def _make_resident(self, name: str, weights: LoraWeights | None) -> None:
        row = self.kernel.adapters.get(name)
        if row.resident:
            return
        weights = weights or self._read_back(row)
        self._evict(self.kernel.adapters.reside(name, weights.nbytes))
        self.runner.lora.add(name, weights)

    def _evict(self, names: list[str]) -> None:
        for name in names:
            self.runner.lora.drop(name)

    def abort_request(self, request_id: str) -> bool:
        seq = self.requests.get(request_id)
        if seq is None or seq.is_finished:
            return False
        self._finish(seq, "abort")
        return True

    def perplexity(self, text: str | list[int]) -> float:
        """exp(mean negative log-likelihood) of a text under the model as this engine computes
        it (its weights, compute path and kernels): how much quantization costs. Idle engine only."""
        if self.has_unfinished():
            raise InvalidRequestError("perplexity: the engine has requests in flight; measure on an idle engine")
        ids = self.tokenizer.encode(text) if isinstance(text, str) else list(text)
        return float(torch.exp(-self.runner.score(ids[:self.max_model_len]).mean()))

    def has_unfinished(self) -> bool:
        return self.kernel.has_work()

    # -- the step ---------------------------------------------------------------------
    def step(self) -> list[StreamDelta]:
        """One iteration: schedule, run one forward pass, sample, detokenize. Returns the
        deltas of every request that produced text or finished in this step."""
        batch = self.kernel.schedule()
        if batch:
            t0 = time.perf_counter()
            logits = self.runner.execute(batch)
            samplers, tokens = self._sample(batch, logits)
            self.kernel.complete_step(batch, time.perf_counter() - t0)
            now = time.time()
            for item, tok in zip(samplers, tokens):
                self._append_token(item.seq, tok, now)
        return self.collect_deltas()

    def _sample(self, batch: list[ScheduledSeq], logits: torch.Tensor) -> tuple[list[ScheduledSeq], list[SampledToken]]:
        samplers = [item for item in batch if item.samples]
        for row, item in enumerate(samplers):
            if item.seq.io.guide is not None:
                item.seq.io.guide.mask_logits(logits[row])
        rows = [SamplingRow(i.seq.params, i.seq.prompt_token_ids, i.seq.output_token_ids, i.seq.generator)
                for i in samplers]
        return samplers, (self.sampler.sample(logits, rows) if rows else [])

    def collect_deltas(self) -> list[StreamDelta]:
        """Deltas produced since the last call, each also pushed to its request's listener;
        finished requests leave the table here, after their last delta."""
        out: list[StreamDelta] = []
        for seq in self.requests.all():
            deltas, seq.io.deltas = seq.io.deltas, []
            out.extend(deltas)
            if seq.listener is not None:
                for d in deltas:
                    seq.listener.push(d)
            if seq.is_finished:
                self.kernel.release(seq)
                if seq.listener is not None:
                    seq.listener.finish(seq.output())
        return out

    # -- postprocess: one sampled token -----------------------------------------------------
    def _append_token(self, seq: Sequence, tok: SampledToken, now: float) -> None:
        io = seq.io
        seq.output_token_ids.append(tok.token_id)
        self.kernel.accounting.on_token(seq, now)
        lp = self._logprob(tok) if seq.params.logprobs is not None else None
        if lp is not None:
            seq.logprobs.append(lp)
        terminated = False
        if io.guide is not None:
            io.guide.accept(tok.token_id)
            terminated = io.guide.is_terminated()
        reason, stop_reason, delta = self._stop(seq, tok.token_id, terminated)
        seq.output_text += delta
        io.deltas.append(StreamDelta(seq.request_id, delta, [tok.token_id], False, None, [lp] if lp else None))
        if reason is not None:
            seq.stop_reason = stop_reason
            self._finish(seq, reason)

    def _stop(self, seq: Sequence, token_id: int, terminated: bool) -> tuple[str | None, str | int | None, str]:
        """(finish reason, stop reason, text to emit) after token_id. EOS ends a request
        unless ignore_eos (vLLM's meaning: EOS may still be sampled, it just does not stop);
        a finished grammar ends it even then."""
        params, io = seq.params, seq.io
        if (token_id in self.eos_token_ids and (not params.ignore_eos or terminated)) or \
                token_id in params.stop_token_ids:
            return "stop", token_id, self._drain(io)
        delta, matched = io.stop.feed(io.detok.push([token_id]))
        if matched is not None:
            return "stop", matched, delta
        if terminated:
            return "stop", token_id, delta + self._drain(io)
        if len(seq.output_token_ids) >= params.max_tokens or len(seq) >= self.max_model_len:
            return "length", None, delta + self._drain(io)
        return None, None, delta

    def _logprob(self, tok: SampledToken) -> TokenLogprob:
        def text(t: int) -> str:
            return self.tokenizer.decode([t], skip_special_tokens=False)
        return TokenLogprob(tok.token_id, text(tok.token_id), tok.logprob,
                            [(t, text(t), v) for t, v in (tok.top_logprobs or [])])

    @staticmethod
    def _drain(io: OutputState) -> str:
        """Text still held back at the end: an unfinished character, a possible stop string."""
        text, _ = io.stop.feed(io.detok.flush())
        return text + io.stop.flush()

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.kernel.finish(seq, reason)
        if seq.io.deltas:
            last = seq.io.deltas[-1]
            last.finished, last.finish_reason = True, reason
        else:
            seq.io.deltas.append(StreamDelta(seq.request_id, "", [], True, reason))
