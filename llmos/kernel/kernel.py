"""The kernel's request side in one object: the table of live requests, admission (bounded
per-tenant queues), the scheduler with its policy and context switcher, and accounting.
The engine asks it what to run each step and tells it what was computed; callers steer
requests (suspend, resume, renice, cancel) through it by id."""

from __future__ import annotations

import time

from llmos.config import EngineConfig
from llmos.errors import QueueFullError
from llmos.kernel.accounting import Accounting
from llmos.kernel.adapters import AdapterTable
from llmos.kernel.block_manager import BlockManager
from llmos.kernel.context_switch import ContextSwitcher, ReadBlocks, WriteBlocks
from llmos.kernel.policy import Policy
from llmos.kernel.request import RequestInfo, RequestTable, ScheduledSeq, Sequence, SequenceStatus
from llmos.kernel.scheduler import Scheduler
from llmos.kernel.stats import BlockOwner, KernelStats, MemoryMap, SwapSlot
from llmos.kernel.swap import SwapSpace
from llmos.kernel.prefix_store import PrefixStore
from llmos.kernel.tenant import TenantTable
from llmos.validate import integer


class Kernel:
    def __init__(self, config: EngineConfig, *, num_blocks: int, bytes_per_block: int,
                 read_blocks: ReadBlocks, write_blocks: WriteBlocks) -> None:
        self.config = config
        self.requests = RequestTable()
        self.tenants = TenantTable(default_max_waiting=config.max_waiting)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.policy = Policy.from_config(config, self.tenants)
        self.switcher = ContextSwitcher(self.block_manager, SwapSpace(config.swap_space, config.swap_dir),
                                        read_blocks=read_blocks, write_blocks=write_blocks,
                                        bytes_per_block=bytes_per_block, mode=config.preemption_mode,
                                        prefix_store=PrefixStore(config.prefix_swap_space))
        self.scheduler = Scheduler(self.block_manager, self.policy, self.tenants, self.switcher,
                                   max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens)
        self.accounting = Accounting(self.tenants)
        self.bytes_per_block = bytes_per_block
        self.adapters = AdapterTable(config.adapter_memory, config.max_loaded_adapters)

    # -- admission and control -------------------------------------------------------------
    def admit(self, seq: Sequence) -> None:
        """Queue a new request, unless its tenant's waiting queue is at its bound."""
        integer("priority", seq.priority)
        bound = self.tenants.get(seq.tenant).max_waiting
        if bound is not None:
            queued = self.scheduler.num_queued(seq.tenant)
            if queued >= bound:
                raise QueueFullError(f"tenant {seq.tenant!r} already has {queued} requests waiting "
                                     f"(max_waiting={bound}); retry later")
        if seq.adapter is not None:
            seq.adapter_id = self.adapters.acquire(seq.adapter, seq.tenant, seq.request_id).uid
        self.requests.add(seq)
        self.scheduler.add(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a request: its blocks and swap space return at once. It stays in the table
        until its output has been delivered (`release`)."""
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        if seq.adapter is not None:
            self.adapters.release(seq.adapter, seq.request_id)
        seq.status = SequenceStatus.FINISHED
        seq.metrics.finished_time = time.time()

    def release(self, seq: Sequence) -> None:
        self.requests.remove(seq.request_id)

    def suspend(self, request_id: str) -> bool:
        seq = self.requests.get(request_id)
        return seq is not None and self.scheduler.suspend(seq)

    def resume(self, request_id: str) -> bool:
        seq = self.requests.get(request_id)
        return seq is not None and self.scheduler.resume(seq)

    def set_priority(self, request_id: str, priority: int, weight: float | None = None) -> bool:
        integer("priority", priority)
        seq = self.requests.get(request_id)
        if seq is None:
            return False
        seq.priority = priority
        if weight is not None:
            seq.weight = weight
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- each step ---------------------------------------------------------------------
    def schedule(self) -> list[ScheduledSeq]:
        batch = self.scheduler.schedule()
        now = time.time()
        for item in batch:
            if item.seq.metrics.first_scheduled_time is None:
                item.seq.metrics.first_scheduled_time = now
        return batch

    def complete_step(self, batch: list[ScheduledSeq], seconds: float) -> None:
        self.accounting.on_step(batch, self.scheduler.complete_step(batch, seconds))

    # -- reading ---------------------------------------------------------------------------
    def list_requests(self) -> list[RequestInfo]:
        return [RequestInfo.of(s) for s in self.requests.all() if not s.is_finished]

    def stats(self) -> KernelStats:
        return self.accounting.snapshot(self.scheduler, self.config.scheduling_policy)

    def memory_map(self) -> MemoryMap:
        """Who holds each KV block now, and what lies in the swap tier."""
        bm, swap = self.block_manager, self.switcher.swap
        blocks = [-2 if b.hash is not None else -1 for b in bm.blocks]
        owners: list[BlockOwner] = []
        tenant_of: dict[str, str] = {}
        for seq in self.requests.all():
            tenant_of[seq.request_id] = seq.tenant
            if seq.block_table:
                owners.append(BlockOwner(seq.request_id, seq.tenant))
                for block_id in seq.block_table:
                    if blocks[block_id] < 0:
                        blocks[block_id] = len(owners) - 1
        shared = [b.block_id for b in bm.blocks if b.ref_count > 1]
        slots = [SwapSlot(key, tenant_of.get(key, "default"), e.num_blocks, e.tier, e.compressed)
                 for key, e in list(swap.entries.items())]
        store = self.switcher.prefix_store
        return MemoryMap(bm.num_blocks, bm.block_size, self.bytes_per_block, blocks, owners, shared,
                         slots, swap.host_used, swap.host_budget, swap.disk_used, len(store) if store else 0)
