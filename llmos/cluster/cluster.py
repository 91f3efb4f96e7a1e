"""`ClusterLLM`: the `LLM` interface over many engine replicas on Ray, so the same server,
CLI and agents front a cluster unchanged.

Each replica is an `EngineReplica` actor with its own KV pool and kernel. The router in
this process places every request (prefix affinity balanced against load, sticky
sessions) and keeps the tenants' fair share across replicas. Every request is streamed
token by token through its `ClusterHandle`, which therefore knows exactly what the client
has seen: when a replica dies mid-stream, the handle re-runs the request on another
replica from its prompt plus the tokens already streamed, with the budget that is left,
and the stream continues without a gap or a repeat. Ray restarts the dead actor; the
supervisor thread notices when it answers again and routes to it.

What does not carry over a failover exactly: a seeded sampler's random stream starts
afresh on the new replica, and penalties that count only output tokens (presence,
frequency) see the streamed tokens as prompt. Greedy decoding continues identically."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
import time

from llmos.cluster.handle import ClusterHandle
from llmos.cluster.replica import EngineReplica
from llmos.cluster.router import Router
from llmos.config import EngineConfig
from llmos.errors import InvalidRequestError, LLMOSError, PromptTooLongError, QueueFullError
from llmos.kernel.request import RequestInfo
from llmos.kernel.stats import KernelStats, MemoryMap, merge_maps, merge_stats
from llmos.models.tokenizer import Tokenizer
from llmos.sampling_params import SamplingParams

log = logging.getLogger("llmos.cluster")

HEALTH_INTERVAL = 0.5
NAMESPACE = "llmos"       # replicas are named actors here: llmos-replica-<index>-<server pid>


@dataclasses.dataclass
class ReplicaSlot:
    index: int
    actor: object
    info: dict | None = None
    restarts: int = 0
    down_since: float | None = None      # when it was seen dead (None while it serves)
    recovered: list[float] = dataclasses.field(default_factory=list)   # seconds from death to serving again


class ClusterLLM:
    """The `LLM` interface over `replicas` engine replicas on a Ray cluster (`address`, or a
    local one started here). `settings` are EngineConfig's, applied to every replica."""

    def __init__(self, model: str = "smollm2-135m", *, replicas: int = 2, address: str | None = None,
                 cpus_per_replica: float = 1.0, threads_per_replica: int = 1, gpus_per_replica: float = 0.0,
                 max_inflight_per_replica: int | None = None, affinity_slack: int = 4, routing: str = "affinity",
                 **settings) -> None:
        import ray
        if replicas < 1:
            raise InvalidRequestError(f"replicas: need at least 1, got {replicas}")
        self.config = EngineConfig(model=model, **settings)
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            ray.init(address=address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
                     configure_logging=False,
                     **({} if address else {"num_cpus": max(os.cpu_count() or 1,
                                                            int(replicas * cpus_per_replica + 0.999)),
                                            "object_store_memory": 256 << 20}))
        self.ray_address = ray.get_runtime_context().gcs_address
        self._actor_class = ray.remote(num_cpus=cpus_per_replica, num_gpus=gpus_per_replica, max_restarts=-1,
                                       max_task_retries=0, max_concurrency=4096)(EngineReplica)
        self._model, self._settings, self._threads = model, dict(settings), threads_per_replica
        self.router = Router(self.config.block_size, max_inflight_per_replica or self.config.max_num_seqs,
                             affinity_slack, routing)
        self.slots: dict[int, ReplicaSlot] = {}
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._table: dict[str, ClusterHandle] = {}
        self._tenants: dict[str, dict] = {}
        self._adapters: dict[str, tuple[str, list[str] | None, object]] = {}   # name -> (path, tenants, info)
        self._ids = itertools.count()
        self._next_index = itertools.count()
        self._closed = False
        self._start_replicas(replicas)
        info = next(iter(self.slots.values())).info
        self.tokenizer = Tokenizer.from_json(info["tokenizer"])
        self.model_name, self.max_model_len = info["model_name"], info["max_model_len"]
        self.kv_block_bytes, self._num_blocks = info["kv_block_bytes"], info["num_blocks"]
        self._threads_ = [threading.Thread(target=self._dispatch_loop, name="llmos-router", daemon=True),
                          threading.Thread(target=self._health_loop, name="llmos-cluster-health", daemon=True)]
        for t in self._threads_:
            t.start()

    # -- replicas ----------------------------------------------------------------------------
    def _spawn(self, index: int):
        return self._actor_class.options(name=f"llmos-replica-{index}-{os.getpid()}").remote(
            index, self._model, self._settings, self._threads)

    def _start_replicas(self, n: int) -> list[int]:
        import ray
        new = [ReplicaSlot(i, self._spawn(i)) for i in (next(self._next_index) for _ in range(n))]
        infos = ray.get([s.actor.info.remote() for s in new])
        with self._lock:
            for slot, info in zip(new, infos):
                slot.info = info
                self.slots[slot.index] = slot
                self.router.add_replica(slot.index)
                self.router.replicas[slot.index].alive = True
                self.router.replicas[slot.index].kv_total = info["num_blocks"]
                self._restore(slot)
            self._wake.notify_all()
        return [s.index for s in new]

    def _restore(self, slot: ReplicaSlot) -> None:
        """A new or restarted replica gets the tenants' settings and the adapters the others have."""
        for name, kw in self._tenants.items():
            slot.actor.set_tenant.remote(name, kw)
        for name, (path, tenants, _) in self._adapters.items():
            slot.actor.call.remote("load_adapter", name, path, tenants=tenants)

    def scale(self, n: int, timeout: float = 60.0) -> list[int]:
        """Add replicas, or drain and remove the newest ones (their requests finish first, up
        to `timeout`, then move to the others as on a failure)."""
        import ray
        if n < 1:
            raise InvalidRequestError(f"replicas: need at least 1, got {n}")
        with self._lock:
            current = sorted(self.slots)
        if n > len(current):
            self._start_replicas(n - len(current))
        elif n < len(current):
            gone = current[n:]
            with self._lock:
                for i in gone:
                    self.router.replicas[i].draining = True
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and any(self.router.replicas[i].inflight for i in gone):
                time.sleep(0.1)
            for i in gone:
                with self._lock:
                    slot = self.slots.pop(i)
                ray.kill(slot.actor, no_restart=True)
                with self._lock:
                    self.router.remove_replica(i)
        return sorted(self.slots)

    def replicas(self) -> list[dict]:
        """Each replica: its index, process, node, state, load, restarts and recovery times."""
        out = []
        with self._lock:
            for i, slot in sorted(self.slots.items()):
                r = self.router.replicas.get(i)
                out.append({"index": i, "pid": (slot.info or {}).get("pid"), "node": (slot.info or {}).get("node"),
                            "state": "draining" if r and r.draining else "up" if r and r.alive else "down",
                            "inflight": r.inflight if r else 0, "kv_used": r.kv_used if r else 0,
                            "kv_total": r.kv_total if r else 0, "restarts": slot.restarts,
                            "recovery_seconds": list(slot.recovered)})
        return out

    def _replica_down(self, index: int) -> None:
        with self._lock:
            slot = self.slots.get(index)
            if slot is not None and slot.down_since is None:
                slot.down_since = time.monotonic()
                self.router.replica_lost(index)

    def _health_loop(self) -> None:
        import ray
        while not self._closed:
            with self._lock:
                slots = list(self.slots.values())
            refs = [(s, s.actor.load.remote()) for s in slots]
            for slot, ref in refs:
                try:
                    load = ray.get(ref, timeout=5.0)
                except ray.exceptions.GetTimeoutError:
                    continue                                   # busy, not dead
                except ray.exceptions.ActorDiedError:
                    self._replica_down(slot.index)
                    self._replace(slot)
                    continue
                except (ray.exceptions.RayActorError, ray.exceptions.RayError):
                    self._replica_down(slot.index)             # restarting
                    continue
                self._replica_up(slot, load)
            time.sleep(HEALTH_INTERVAL)

    def _replica_up(self, slot: ReplicaSlot, load: dict) -> None:
        with self._lock:
            r = self.router.replicas.get(slot.index)
            if r is None:
                return
            r.kv_used, r.kv_total = load["kv_used"], load["kv_total"]
            if slot.down_since is not None or not r.alive:
                if slot.down_since is not None:
                    slot.recovered.append(round(time.monotonic() - slot.down_since, 3))
                    slot.restarts += 1
                    log.info("replica %d is back (pid %s)", slot.index, load["pid"])
                slot.down_since = None
                slot.info = {**(slot.info or {}), "pid": load["pid"]}
                r.alive = True
                self._restore(slot)
                self._wake.notify_all()

    def _replace(self, slot: ReplicaSlot) -> None:
        """An actor Ray will not restart (killed for good, its node gone): start a new one."""
        if self._closed or self.router.replicas.get(slot.index) is None or self.router.replicas[slot.index].draining:
            return
        slot.actor = self._spawn(slot.index)

    # -- dispatch ----------------------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        with self._lock:
            while not self._closed:
                if self._next_ready() is None:
                    self._wake.wait(0.5)

    def _next_ready(self) -> ClusterHandle | None:
        """Under the lock: grant the next queued request a replica, if one has room."""
        if not self.router.open_replicas():
            return None
        handle = self.router.pop(lambda h: not h._suspended)
        if handle is None:
            return None
        handle.replica = self.router.place(handle.hashes, handle.session)
        if not handle._charged and not handle.failovers:
            # charged in full when it starts (what it may cost), the unused part given back
            # when it ends: the clock sees work in flight, not only work done
            self.router.charge(handle.tenant, len(handle.prompt_ids) + handle.params.max_tokens)
            handle._charged = True
        handle._granted.set()
        return handle

    def _requeue(self, handle: ClusterHandle) -> None:
        with self._lock:
            handle.replica = None
            handle._status = "waiting"
            self.router.enqueue(handle, handle.tenant, handle.priority, urgent=True)
            self._wake.notify_all()

    def _charge(self, tenant: str, tokens: int) -> None:
        with self._lock:
            self.router.charge(tenant, tokens)

    def _forget(self, handle: ClusterHandle) -> None:
        with self._lock:
            self._table.pop(handle.request_id, None)
            self.router.finished(handle.tenant)
            self._wake.notify_all()

    def _forward(self, handle: ClusterHandle, action: str, *args) -> tuple[bool, str | None]:
        import ray
        slot = self.slots.get(handle.replica) if handle.replica is not None else None
        if slot is None:
            return False, None
        try:
            return ray.get(slot.actor.act.remote(handle.request_id, action, *args), timeout=30)
        except ray.exceptions.RayError:
            return False, None

    def _act(self, handle: ClusterHandle, action: str, *args) -> bool:
        """cancel / suspend / resume / set_priority: in the router's queue, or on the replica."""
        with self._lock:
            if handle.done:
                return False
            if action == "cancel":
                handle._cancelled = True
            elif action == "suspend":
                handle._suspended = True
            elif action == "resume":
                handle._suspended = False
            elif action == "set_priority":
                handle.priority = handle.labels["priority"] = args[0]
            queued = handle.replica is None
            if queued:
                if action == "cancel" and self.router.remove(handle, handle.tenant):
                    handle._granted.set()
                elif action == "set_priority":
                    self.router.reprioritize(handle, handle.tenant, args[0])
                handle._status = {"suspend": "suspended", "resume": "waiting"}.get(action, handle._status)
                self._wake.notify_all()
                return True
        ok, state = self._forward(handle, action, *args)
        if state is not None and not handle.done:
            handle._status = state
        return ok

    # -- the LLM interface ----------------------------------------------------------------------
    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            ids = self.tokenizer.encode_chat(prompt)[1]
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.tokenizer.vocab_size]
            if bad:
                raise InvalidRequestError(f"prompt: token ids must be in [0, {self.tokenizer.vocab_size}), got {bad[:5]}")
            ids = list(prompt)
        else:
            raise InvalidRequestError("prompt: expected a string, a list of token ids or a list of chat messages, "
                                      f"got {type(prompt).__name__}")
        if not ids:
            raise InvalidRequestError("prompt: encodes to zero tokens")
        return ids

    def _check_fits(self, n: int, max_tokens: int) -> None:
        total = n + max_tokens
        if total > self.max_model_len:
            raise PromptTooLongError(f"prompt: {n} prompt tokens + max_tokens {max_tokens} = {total} exceeds the "
                                     f"model's context length of {self.max_model_len} tokens")
        capacity = self._num_blocks * self.config.block_size
        if total > capacity:
            raise PromptTooLongError(f"prompt: {n} prompt tokens + max_tokens {max_tokens} = {total} can never fit "
                                     f"a replica's KV cache of {capacity} tokens")

    def submit(self, prompt, params: SamplingParams | None = None, *, tenant: str = "default", priority: int = 0,
               request_id: str | None = None, user: str | None = None, owner_pid: int | None = None,
               weight: float = 1.0, kv_quota: int | None = None, adapter: str | None = None) -> ClusterHandle:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params: expected SamplingParams, got {type(params).__name__}")
        ids = self._encode(prompt)
        self._check_fits(len(ids), params.max_tokens)
        if params.guided is not None:
            from llmos.engine.guided import JsonBounds, compile_guide
            compile_guide(params.guided, self.tokenizer,
                          JsonBounds(self.config.json_max_digits, self.config.json_max_string_length))
        if adapter is not None and adapter not in self._adapters:
            raise InvalidRequestError(f"adapter: no adapter {adapter!r} is loaded; loaded: {sorted(self._adapters)}")
        rid = request_id or f"req-{next(self._ids)}"
        labels = {"tenant": tenant, "priority": priority, "user": user, "owner_pid": owner_pid, "weight": weight,
                  "kv_quota": kv_quota, "adapter": adapter}
        session = f"pid:{owner_pid}" if owner_pid is not None else f"user:{tenant}:{user}" if user else None
        handle = ClusterHandle(self, rid, ids, params, labels, session)
        with self._lock:
            if self._closed:
                raise LLMOSError("the cluster is shutting down")
            if rid in self._table:
                raise InvalidRequestError(f"request_id: {rid!r} is already in use")
            bound = self._tenants.get(tenant, {}).get("max_waiting", self.config.max_waiting)
            if bound is not None and self.router.queued(tenant) >= bound:
                raise QueueFullError(f"tenant {tenant!r} already has {self.router.queued(tenant)} requests waiting "
                                     f"(max_waiting={bound}); retry later")
            self._table[rid] = handle
            self.router.enqueue(handle, tenant, priority)
            self._wake.notify_all()
        threading.Thread(target=handle.run, name=f"llmos-cluster-{rid}", daemon=True).start()
        return handle

    def request(self, request_id: str) -> ClusterHandle | None:
        with self._lock:
            return self._table.get(request_id)

    def requests_of(self, owner_pid: int) -> list[ClusterHandle]:
        with self._lock:
            return [h for h in self._table.values() if h.owner_pid == owner_pid]

    def set_tenant(self, name: str, *, weight: float | None = None, kv_quota: int | str | None = None,
                   max_waiting: int | None = None) -> None:
        kw = {k: v for k, v in (("weight", weight), ("kv_quota", kv_quota), ("max_waiting", max_waiting))
              if v is not None}
        with self._lock:
            self._tenants.setdefault(name, {}).update(kw)
            if weight is not None:
                self.router.set_weight(name, weight)
            slots = list(self.slots.values())
        for slot in slots:
            slot.actor.set_tenant.remote(name, kw)

    # -- adapters: loaded on every replica, so any of them can serve any request ------------
    def _everywhere(self, method: str, *args, **kwargs) -> list:
        import ray
        with self._lock:
            slots = [s for i, s in sorted(self.slots.items()) if self.router.replicas[i].alive]
        try:
            return ray.get([s.actor.call.remote(method, *args, **kwargs) for s in slots])
        except ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause() from None

    def load_adapter(self, name: str, path: str, *, tenants: list[str] | None = None):
        info = self._everywhere("load_adapter", name, str(path), tenants=tenants)[0]
        with self._lock:
            self._adapters[name] = (str(path), tenants, info)
        return info

    def unload_adapter(self, name: str) -> None:
        self._everywhere("unload_adapter", name)
        with self._lock:
            self._adapters.pop(name, None)

    def list_adapters(self) -> list:
        return self._everywhere("list_adapters")[0]

    def adapter(self, name: str):
        with self._lock:
            entry = self._adapters.get(name)
        return entry[2] if entry else None

    def _gather(self, method: str) -> list[tuple[int, object]]:
        """method() on every live replica, in parallel; replicas that do not answer are left out."""
        import ray
        with self._lock:
            live = [(i, s) for i, s in sorted(self.slots.items()) if self.router.replicas[i].alive]
        refs = [(i, getattr(s.actor, method).remote()) for i, s in live]
        out = []
        for i, ref in refs:
            try:
                out.append((i, ray.get(ref, timeout=30)))
            except ray.exceptions.RayError:
                continue
        return out

    def replica_stats(self) -> dict[int, KernelStats]:
        return dict(self._gather("stats"))

    def stats(self) -> KernelStats:
        parts = [s for _, s in self._gather("stats")]
        if not parts:
            raise LLMOSError("no replica of the cluster answers")
        merged = merge_stats(parts)
        with self._lock:
            queued = self.router.queued()
            for name, kw in self._tenants.items():
                if name in merged.tenants and "weight" in kw:
                    merged.tenants[name].weight = kw["weight"]
            for name, vt in self.router.vtime.items():
                if name in merged.tenants:
                    merged.tenants[name].virtual_time = vt
        merged.requests["waiting"] = merged.requests.get("waiting", 0) + queued
        return merged

    def list_requests(self) -> list[RequestInfo]:
        rows = [dataclasses.replace(r, replica=i) for i, part in self._gather("list_requests") for r in part]
        with self._lock:
            placed = {r.request_id for r in rows}
            rows += [h.info() for h in self._table.values() if h.replica is None and h.request_id not in placed
                     and not h.done]
        return rows

    def memory_map(self) -> MemoryMap:
        maps = [m for _, m in self._gather("memory_map")]
        if not maps:
            raise LLMOSError("no replica of the cluster answers")
        return merge_maps(maps)

    def routing_stats(self) -> dict:
        with self._lock:
            r = self.router
            return {"policy": r.policy, "ray_address": self.ray_address, "routed": r.routed,
                    "affinity_routed": r.affinity_routed, "queued": r.queued(),
                    "queued_by_tenant": {t: r.queued(t) for t in r.tenants_queued()},
                    "prefix_blocks_queried": r.queried_blocks, "prefix_blocks_matched": r.matched_blocks,
                    "virtual_time": dict(r.vtime)}

    def close(self) -> None:
        import ray
        with self._lock:
            if self._closed:
                return
            self._closed = True
            handles = list(self._table.values())
            self._wake.notify_all()
        for h in handles:
            h.cancel()
            h._granted.set()
        for h in handles:                   # their streams end before Ray goes away under them
            h._done.wait(10)
        for t in self._threads_:
            t.join(10)
        for slot in list(self.slots.values()):
            try:
                ray.kill(slot.actor, no_restart=True)
            except ray.exceptions.RayError:
                pass
        if self._started_ray:
            ray.shutdown()

    def __enter__(self) -> ClusterLLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
