"""The vLLM-style Python entry point: `LLM(model=...).generate(prompts, SamplingParams(...))`,
plus the kernel's asynchronous handle API (`submit`) and tenant controls."""

from __future__ import annotations

import dataclasses

from collections.abc import Iterator, Sequence as Seq

from llmos.api.handle import RequestHandle
from llmos.config import EngineConfig, parse_size
from llmos.engine.engine_loop import EngineLoop
from llmos.engine.llm_engine import LLMEngine
from llmos.errors import InvalidRequestError
from llmos.kernel.adapters import AdapterInfo, check_name
from llmos.kernel.request import RequestInfo
from llmos.kernel.stats import KernelStats, MemoryMap
from llmos.outputs import RequestOutput, StreamDelta
from llmos.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "smollm2-135m", **settings) -> None:
        """Settings are EngineConfig's fields: kv_cache_memory, block_size, max_num_seqs,
        max_num_batched_tokens, enable_prefix_caching, device, dtype, max_model_len, seed,
        scheduling_policy, preemption_mode, swap_space, swap_dir, aging_rate, rr_quantum,
        max_waiting, adapter_memory, max_loaded_adapters, max_lora_rank."""
        known = set(EngineConfig.__dataclass_fields__)
        unknown = sorted(set(settings) - known)
        if unknown:
            raise InvalidRequestError(f"unknown setting(s) {unknown}; known: {sorted(known - {'model'})}")
        self.config = EngineConfig(model=model, **settings)
        self.engine = LLMEngine(self.config)
        self.loop = EngineLoop(self.engine)

    def get_tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        """Prompt plus output tokens one request may hold."""
        return self.engine.max_model_len

    @property
    def kv_block_bytes(self) -> int:
        """Bytes of one KV block (every layer's K and V for block_size tokens)."""
        return self.engine.kernel.bytes_per_block

    def close(self) -> None:
        self.loop.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the asynchronous API -------------------------------------------------------------
    def submit(self, prompt: str | list[int] | list[dict], params: SamplingParams | None = None, *,
               tenant: str = "default", priority: int = 0, request_id: str | None = None,
               user: str | None = None, owner_pid: int | None = None, weight: float = 1.0,
               kv_quota: int | None = None, adapter: str | None = None) -> RequestHandle:
        """Queue one request (a prompt, token ids or chat messages) and return its handle at
        once. Safe to call from many threads. Raises QueueFull when the tenant's waiting
        queue is at its bound, PromptTooLongError when it can never fit. `owner_pid` names
        the agent process it belongs to: the tenant's share is split between its processes
        by `weight` under the fair policy, and its running requests hold at most `kv_quota`
        KV blocks together. `adapter` names a loaded LoRA adapter to run it through."""
        handle = RequestHandle(self.loop)
        group = None if owner_pid is None else f"pid:{owner_pid}"
        self.loop.submit(prompt, params, handle, tenant=tenant, priority=priority, request_id=request_id,
                         user=user, owner_pid=owner_pid, group=group, weight=weight, group_kv_quota=kv_quota,
                         adapter=adapter)
        return handle

    def request(self, request_id: str) -> RequestHandle | None:
        """The handle of a live request, found by id."""
        seq = self.engine.requests.get(request_id)
        return seq.listener if seq is not None and isinstance(seq.listener, RequestHandle) else None

    def requests_of(self, owner_pid: int) -> list[RequestHandle]:
        """Handles of the live requests an agent process made."""
        return [s.listener for s in self.engine.requests.of_process(owner_pid) if isinstance(s.listener, RequestHandle)]

    def set_tenant(self, name: str, *, weight: float | None = None, kv_quota: int | str | None = None,
                   max_waiting: int | None = None) -> None:
        """A tenant's share (weight), its KV quota (blocks, or a size such as "64MiB") and
        the bound on its waiting queue."""
        if isinstance(kv_quota, str):
            kv_quota = max(1, parse_size(kv_quota, "kv_quota") // self.kv_block_bytes)
        self.loop.call(lambda e: e.tenants.set(name, weight=weight, kv_quota=kv_quota, max_waiting=max_waiting))

    def stats(self) -> KernelStats:
        """The kernel's counters, with the engine's compute plan (which weights, which path)."""
        return self.loop.call(lambda e: dataclasses.replace(e.kernel.stats(), compute=e.runner.plan.info()))

    def list_requests(self) -> list[RequestInfo]:
        return self.loop.call(lambda e: e.kernel.list_requests())

    def memory_map(self) -> MemoryMap:
        """The KV pool block by block (owner, free, cached) and the swap tier."""
        return self.loop.call(lambda e: e.kernel.memory_map())

    # -- LoRA adapters ---------------------------------------------------------------------
    def load_adapter(self, name: str, path: str, *, tenants: list[str] | None = None) -> AdapterInfo:
        """Load a LoRA adapter (a PEFT directory or a GGUF LoRA file) under `name`, for the
        given tenants only or (None) for every tenant. Requests then name it with
        `adapter=name`; idle adapters are evicted, least recently used first, when the
        adapter memory (adapter_memory, max_loaded_adapters) is full, and read back from
        their files when asked for again."""
        check_name(name)
        if tenants is not None and (isinstance(tenants, str) or not all(isinstance(t, str) for t in tenants)):
            raise InvalidRequestError(f"tenants: expected a list of tenant names or None, got {tenants!r:.80}")
        ckpt, weights = self.engine.read_adapter(path)     # the slow part, outside the engine lock
        return self.loop.call(lambda e: e.add_adapter(name, ckpt, weights, None if tenants is None else list(tenants)))

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter; refused while live requests use it."""
        self.loop.call(lambda e: e.remove_adapter(name))

    def list_adapters(self) -> list[AdapterInfo]:
        return self.loop.call(lambda e: e.kernel.adapters.list())

    def adapter(self, name: str) -> AdapterInfo | None:
        """One adapter, read without waiting for the engine (for request routing)."""
        row = self.engine.kernel.adapters.find(name)
        return AdapterInfo.of(row) if row is not None else None

    # -- the batch API --------------------------------------------------------------------
    @staticmethod
    def _per_request(value, n: int, name: str, kind) -> list:
        if value is None or isinstance(value, kind):
            return [value] * n
        if isinstance(value, (list, tuple)) and len(value) == n and all(isinstance(v, kind) for v in value):
            return list(value)
        raise InvalidRequestError(f"{name}: expected one {kind.__name__} or a list of {n}, got {value!r:.80}")

    def _run(self, prompts: list, params, tenant, priority, adapter) -> list[RequestOutput]:
        plist = self._per_request(params, len(prompts), "sampling_params", SamplingParams)
        tlist = self._per_request(tenant, len(prompts), "tenant", str)
        qlist = self._per_request(priority, len(prompts), "priority", int)
        alist = adapter if isinstance(adapter, (list, tuple)) else [adapter] * len(prompts)
        if len(alist) != len(prompts) or not all(a is None or isinstance(a, str) for a in alist):
            raise InvalidRequestError(f"adapter: expected one adapter name (or None) or a list of {len(prompts)}, "
                                      f"got {adapter!r:.80}")
        handles: list[RequestHandle] = []
        try:
            for p, sp, t, q, a in zip(prompts, plist, tlist, qlist, alist):
                handles.append(self.submit(p, sp, tenant=t or "default", priority=q or 0, adapter=a))
        except Exception:
            for h in handles:
                h.cancel()
            raise
        return [h.result() for h in handles]

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *,
                 tenant: str | list[str] | None = None, priority: int | list[int] | None = None,
                 adapter: str | list[str | None] | None = None) -> list[RequestOutput]:
        """Completes each prompt (a string or a list of token ids); all run in one batch,
        each through its LoRA `adapter` (one name for all, or one per prompt; None: the base model)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, list):
            raise InvalidRequestError(f"prompts: expected a string or a list, got {type(prompts).__name__}")
        return self._run(prompts, sampling_params, tenant, priority, adapter)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *,
             tenant: str | list[str] | None = None, priority: int | list[int] | None = None,
             adapter: str | list[str | None] | None = None) -> list[RequestOutput]:
        """Answers each conversation (a list of {"role", "content"} messages) with the model's
        chat template, each through its LoRA `adapter` as in generate."""
        if isinstance(messages, list) and messages and isinstance(messages[0], dict):
            messages = [messages]
        if not isinstance(messages, list) or not all(isinstance(c, list) and c and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content", ""), str)
                for m in c) for c in messages):
            raise InvalidRequestError("messages: expected a list of {'role': str, 'content': str} messages "
                                      "or a list of such conversations")
        return self._run(messages, sampling_params, tenant, priority, adapter)

    def stream(self, prompt: str | list[int] | list[dict], sampling_params: SamplingParams | None = None, *,
               tenant: str = "default", priority: int = 0, adapter: str | None = None) -> Iterator[StreamDelta]:
        """Yields one request's output as it is produced: text deltas that never split a
        character or show part of a stop string; the last one has finished=True. Closing the
        iterator early cancels the request."""
        handle = self.submit(prompt, sampling_params, tenant=tenant, priority=priority, adapter=adapter)
        try:
            yield from handle
        finally:
            handle.cancel()
