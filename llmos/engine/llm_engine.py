"""The engine: admits requests, runs scheduler -> model runner -> sampler once per step,
and turns sampled tokens into text, stop decisions and finished outputs."""

from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass, field

import torch

from llmos.config import EngineConfig
from llmos.kernel.block_manager import BlockManager
from llmos.engine.detokenizer import IncrementalDetokenizer, StopChecker
from llmos.engine.model_runner import ModelRunner, kv_bytes_per_block
from llmos.engine.sampler import Sampler, SamplingRow, make_generator
from llmos.kernel.policy import POLICIES
from llmos.kernel.stats import KernelStats
from llmos.kernel.scheduler import Scheduler
from llmos.kernel.swap import SwapSpace
from llmos.kernel.tenant import TenantTable
from llmos.engine.sequence import Sequence, SequenceStatus
from llmos.errors import InvalidRequestError, PromptTooLongError, QueueFullError
from llmos.models.loader import load_model
from llmos.outputs import RequestOutput, StreamDelta, TokenLogprob
from llmos.sampling_params import SamplingParams

log = logging.getLogger("llmos.engine")


@dataclass
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    stop: StopChecker
    guide: object | None = None        # a llmos.engine.guided.Guide when the output is constrained
    deltas: list[StreamDelta] = field(default_factory=list)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        loaded = load_model(config.model)
        self.model_name = loaded.name
        self.model_config = cfg = loaded.config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.runner = ModelRunner(cfg, loaded.weights, block_size=config.block_size,
                                  kv_cache_memory=config.kv_cache_memory, max_model_len=self.max_model_len,
                                  device=config.device, dtype=config.dtype, decode_dtype=config.decode_dtype)
        del loaded
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.tenants = TenantTable(default_max_waiting=config.max_waiting)
        policy_cls = POLICIES[config.scheduling_policy]
        if config.scheduling_policy == "priority":
            self.policy = policy_cls(self.tenants, aging_rate=config.aging_rate)
        elif config.scheduling_policy == "rr":
            self.policy = policy_cls(self.tenants, quantum=config.rr_quantum)
        else:
            self.policy = policy_cls(self.tenants)
        self.swap = SwapSpace(config.swap_space, config.swap_dir)
        self.scheduler = Scheduler(
            self.block_manager, self.policy, self.tenants, self.swap,
            read_blocks=self.runner.read_blocks, write_blocks=self.runner.write_blocks,
            bytes_per_block=kv_bytes_per_block(cfg, config.block_size, self.runner.dtype),
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            preemption_mode=config.preemption_mode)
        self.sampler = Sampler()
        self.metrics = KernelStats()
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.eos_token_ids = set(self.tokenizer.eos_token_ids)
        self.num_steps = 0
        self.tokens_generated = 0
        self.tokens_prefilled = 0

    # -- requests --------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int] | list[dict]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
            return text, self.tokenizer.encode(text, add_special_tokens=False)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not prompt:
                raise InvalidRequestError("prompt: must not be empty")
            bad = [t for t in prompt if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise InvalidRequestError(f"prompt: token ids must be in [0, {self.model_config.vocab_size}), got {bad[:5]}")
            return None, list(prompt)
        raise InvalidRequestError(
            f"prompt: expected a string, a list of token ids or a list of chat messages, got {type(prompt).__name__}")

    def prepare_request(self, prompt: str | list[int] | list[dict], params: SamplingParams | None = None
                        ) -> tuple[str | None, list[int], SamplingParams]:
        """Validation and tokenization: everything about a request that needs no engine state,
        so callers on other threads can do it without waiting for a step to end."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params: expected SamplingParams, got {type(params).__name__}")
        text, ids = self.encode_prompt(prompt)
        if not ids:
            raise InvalidRequestError("prompt: encodes to zero tokens")
        self.check_fits(len(ids), params.max_tokens)
        if params.guided is not None:
            from llmos.engine.guided import compile_guide
            compile_guide(params.guided, self.tokenizer)   # a bad schema fails here, in the caller's thread
        return text, ids, params

    def add_request(self, prompt: str | list[int] | list[dict], params: SamplingParams | None = None, *,
                    request_id: str | None = None, tenant: str = "default", priority: int = 0,
                    prepared: tuple[str | None, list[int], SamplingParams] | None = None) -> Sequence:
        text, ids, params = prepared or self.prepare_request(prompt, params)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidRequestError(f"priority: must be an integer, got {priority!r}")
        t = self.tenants.get(tenant)
        if t.max_waiting is not None:
            queued = sum(1 for s in self.scheduler.waiting if s.tenant == tenant and s.num_computed_tokens == 0)
            if queued >= t.max_waiting:
                raise QueueFullError(f"tenant {tenant!r} already has {queued} requests waiting "
                                     f"(max_waiting={t.max_waiting}); retry later")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise InvalidRequestError(f"request_id: {rid!r} is already in use")
        seq = Sequence(rid, text, ids, params, make_generator(params.seed, self._rng.getrandbits(63)),
                       tenant=tenant, priority=priority)
        guide = None
        if params.guided is not None:
            from llmos.engine.guided import compile_guide
            guide = compile_guide(params.guided, self.tokenizer).new_guide()
        self.requests[rid] = _Request(seq, IncrementalDetokenizer(self.tokenizer, ids),
                                      StopChecker(params.stop, params.include_stop_str_in_output), guide)
        self.scheduler.add(seq)
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

    def abort_request(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None or req.seq.is_finished:
            return False
        self._finish(req, "abort")
        return True

    def suspend_request(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        return req is not None and self.scheduler.suspend(req.seq)

    def resume_request(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        return req is not None and self.scheduler.resume(req.seq)

    def set_priority(self, request_id: str, priority: int) -> bool:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidRequestError(f"priority: must be an integer, got {priority!r}")
        req = self.requests.get(request_id)
        if req is None:
            return False
        req.seq.priority = priority
        return True

    def list_requests(self) -> list[dict]:
        return [{"request_id": r.seq.request_id, "tenant": r.seq.tenant, "priority": r.seq.priority,
                 "state": r.seq.status.value, "prompt_tokens": r.seq.num_prompt_tokens,
                 "output_tokens": len(r.seq.output_token_ids), "kv_blocks": len(r.seq.block_table)}
                for r in self.requests.values()]

    def stats(self) -> dict:
        sch, bm, swap = self.scheduler, self.block_manager, self.swap
        per_state: dict[str, dict[str, int]] = {}
        for name, q in (("waiting", sch.waiting), ("running", sch.running), ("swapped", sch.swapped),
                        ("suspended", sch.suspended)):
            counts: dict[str, int] = {}
            for s in q:
                counts[s.tenant] = counts.get(s.tenant, 0) + 1
            per_state[name] = counts
        return {
            "requests": {k: sum(v.values()) for k, v in per_state.items()},
            "requests_by_tenant": per_state,
            "tenants": {t.name: {"weight": t.weight, "kv_quota": t.kv_quota, "max_waiting": t.max_waiting,
                                 "tokens_served": t.tokens_served, "prompt_tokens": t.prompt_tokens,
                                 "output_tokens": t.output_tokens, "virtual_time": t.vtime,
                                 "kv_blocks": bm.tenant_blocks(sch.running).get(t.name, 0)}
                        for t in self.tenants.all()},
            "tokens": {"prompt": self.tokens_prefilled, "generated": self.tokens_generated},
            "steps": self.num_steps,
            "preemptions": dict(sch.num_preemptions),
            "swap": {"bytes_out": swap.bytes_out, "bytes_in": swap.bytes_in, "host_bytes": swap.host_used,
                     "disk_bytes": swap.disk_used, "host_budget": swap.host_budget,
                     "compressed_entries": swap.num_compressed,
                     "bytes_saved_by_compression": swap.bytes_saved_by_compression, "swap_ins": sch.num_swap_ins},
            "kv_blocks": {"total": bm.num_blocks, "used": bm.num_used_blocks, "free": bm.num_free_blocks,
                          "cached": bm.num_cached_blocks, "block_size": bm.block_size,
                          "swapped": sum(e.num_blocks for e in swap.entries.values()),
                          "compressed": sum(e.num_blocks for e in swap.entries.values() if e.compressed)},
            "prefix_cache": {"queries": bm.prefix_queries, "hits": bm.prefix_hits,
                             "hit_rate": bm.prefix_hits / bm.prefix_queries if bm.prefix_queries else 0.0},
            "scheduling_policy": self.config.scheduling_policy,
            "cost_model": {"copy_bytes_per_s": sch.copy_bytes_per_s, "prefill_tokens_per_s": sch.prefill_tokens_per_s},
            "histograms": self.metrics.snapshot(),
        }

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step ---------------------------------------------------------------------
    def step(self) -> list[StreamDelta]:
        """One iteration: schedule, run one forward pass, sample, detokenize. Returns the
        deltas of every request that produced text or finished in this step."""
        batch = self.scheduler.schedule()
        if batch:
            now = time.time()
            for item in batch:
                if item.seq.metrics.first_scheduled_time is None:
                    item.seq.metrics.first_scheduled_time = now
            t0 = time.perf_counter()
            logits = self.runner.execute(batch)
            samplers = [item for item in batch if item.samples]
            rows = [SamplingRow(i.seq.params, i.seq.prompt_token_ids, i.seq.output_token_ids, i.seq.generator)
                    for i in samplers]
            guides = [self.requests[i.seq.request_id].guide for i in samplers]
            for row, guide in enumerate(guides):
                if guide is not None:
                    guide.mask_logits(logits[row])
            sampled = self.sampler.sample(logits, rows) if rows else []
            self.num_steps += 1
            prefill = 0
            for item in batch:
                seq = item.seq
                start = seq.num_computed_tokens
                seq.num_computed_tokens += item.num_new_tokens
                self.block_manager.register_full_blocks(seq, start)
                tenant = self.tenants.get(seq.tenant)
                if item.num_new_tokens > 1 or not item.samples:
                    prefill += item.num_new_tokens
                    tenant.prompt_tokens += item.num_new_tokens
                tenant.tokens_served += item.num_new_tokens
                self.policy.on_served(seq, item.num_new_tokens)
            self.tokens_prefilled += prefill
            self.scheduler.observe_step(prefill, time.perf_counter() - t0)
            now = time.time()
            for item, tok in zip(samplers, sampled):
                self._append_token(self.requests[item.seq.request_id], tok, now)
        return self.collect_deltas()

    def collect_deltas(self) -> list[StreamDelta]:
        """Deltas produced since the last call; finished requests are forgotten here."""
        out: list[StreamDelta] = []
        for req in list(self.requests.values()):
            if req.deltas:
                out.extend(req.deltas)
                req.deltas = []
            if req.seq.is_finished:
                del self.requests[req.seq.request_id]
        return out

    def _append_token(self, req: _Request, tok, now: float) -> None:
        seq, params = req.seq, req.seq.params
        seq.output_token_ids.append(tok.token_id)
        self.tokens_generated += 1
        self.tenants.get(seq.tenant).output_tokens += 1
        m = seq.metrics
        if m.first_token_time is None:
            m.first_token_time = now
            m.num_cached_tokens = seq.num_cached_tokens
            self.metrics.observe("time_to_first_token_seconds", seq.tenant, now - m.arrival_time)
            if m.first_scheduled_time is not None:
                self.metrics.observe("queue_time_seconds", seq.tenant, m.first_scheduled_time - m.arrival_time)
        else:
            self.metrics.observe("inter_token_latency_seconds", seq.tenant, now - m.last_token_time)
        m.last_token_time = now
        m.num_output_tokens += 1
        lp = None
        if params.logprobs is not None:
            name = self.tokenizer.id_to_token
            lp = TokenLogprob(tok.token_id, name(tok.token_id), tok.logprob,
                              [(t, name(t), v) for t, v in (tok.top_logprobs or [])])
            seq.logprobs.append(lp)
        reason = stop_reason = None
        terminated = False
        if req.guide is not None:
            req.guide.accept(tok.token_id)
            terminated = req.guide.is_terminated()
        if tok.token_id in self.eos_token_ids and (not params.ignore_eos or terminated):
            reason, stop_reason = "stop", tok.token_id
        elif tok.token_id in params.stop_token_ids:
            reason, stop_reason = "stop", tok.token_id
        if reason is None:
            delta, matched = req.stop.feed(req.detok.push([tok.token_id]))
            if matched is not None:
                reason, stop_reason = "stop", matched
            elif terminated:
                reason, stop_reason = "stop", tok.token_id
                delta += self._drain(req)
            elif len(seq.output_token_ids) >= params.max_tokens or len(seq) >= self.max_model_len:
                reason = "length"
                delta += self._drain(req)
        else:
            delta = self._drain(req)
        seq.output_text += delta
        req.deltas.append(StreamDelta(seq.request_id, delta, [tok.token_id], False, None, [lp] if lp else None))
        if reason is not None:
            seq.stop_reason = stop_reason
            self._finish(req, reason)

    @staticmethod
    def _drain(req: _Request) -> str:
        """Text still held back at the end: an unfinished character, a possible stop string."""
        text, _ = req.stop.feed(req.detok.flush())
        return text + req.stop.flush()

    def _finish(self, req: _Request, reason: str) -> None:
        seq = req.seq
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.metrics.finished_time = time.time()
        if req.deltas:
            last = req.deltas[-1]
            last.finished, last.finish_reason = True, reason
        else:
            req.deltas.append(StreamDelta(seq.request_id, "", [], True, reason))

    def output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, seq.output_text, list(seq.output_token_ids),
                             seq.is_finished, seq.finish_reason, seq.metrics, seq.logprobs, seq.stop_reason)
