"""Iteration-level scheduler: every step it decides which sequences run and for how many
tokens, and performs the context switches that decision needs.

Each step the policy orders every sequence that wants the machine (running, swapped out,
waiting), most deserving first. The scheduler walks that order and keeps the longest
prefix that fits the batch bound, the KV pool and the tenants' quotas: that is the set
that should be running. A running sequence outside it is preempted — its KV swapped to the
swap tier or dropped for recompute, whichever the cost model says is cheaper — and a
sequence inside it is swapped back in or admitted. Decodes cost one token of the step's
budget; prompts take what remains of it (chunked prefill).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from llmos.engine.sequence import ScheduledSeq, Sequence, SequenceStatus
from llmos.kernel.block_manager import BlockManager
from llmos.kernel.policy import FairShare, Policy
from llmos.kernel.swap import SwapSpace
from llmos.kernel.tenant import TenantTable

PREEMPTION_MODES = ("auto", "swap", "recompute")


class Scheduler:
    def __init__(self, block_manager: BlockManager, policy: Policy, tenants: TenantTable, swap: SwapSpace, *,
                 read_blocks: Callable[[list[int]], torch.Tensor],
                 write_blocks: Callable[[list[int], torch.Tensor], None],
                 bytes_per_block: int, max_num_seqs: int, max_num_batched_tokens: int,
                 preemption_mode: str = "auto", watermark: float = 0.01) -> None:
        self.bm = block_manager
        self.policy = policy
        self.tenants = tenants
        self.swap = swap
        self.read_blocks = read_blocks
        self.write_blocks = write_blocks
        self.bytes_per_block = bytes_per_block
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        # Admission leaves this many blocks free so the running sequences can keep growing.
        self.watermark_blocks = max(1, int(watermark * block_manager.num_blocks))
        self.running: list[Sequence] = []
        self.waiting: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self.suspended: list[Sequence] = []
        self._seq_no = 0
        self.num_preemptions = {"swap": 0, "recompute": 0}
        self.num_swap_ins = 0
        # Cost model inputs, refined from every swap and every step.
        self.copy_bytes_per_s = 4e9
        self.prefill_tokens_per_s = 2000.0

    # -- queues -----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self._seq_no += 1
        seq.seq_no = self._seq_no
        seq.status = SequenceStatus.WAITING
        seq.start_waiting(time.monotonic())
        if isinstance(self.policy, FairShare) and not self._backlogged(seq.tenant):
            self.policy.lift(seq.tenant, {s.tenant for s in self.running + self.waiting + self.swapped})
        self.waiting.append(seq)

    def _backlogged(self, tenant: str) -> bool:
        return any(s.tenant == tenant for s in self.running + self.waiting + self.swapped)

    def _queue_of(self, seq: Sequence) -> list[Sequence] | None:
        return {SequenceStatus.RUNNING: self.running, SequenceStatus.WAITING: self.waiting,
                SequenceStatus.SWAPPED: self.swapped, SequenceStatus.SUSPENDED: self.suspended}.get(seq.status)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of every queue; its blocks return at once."""
        q = self._queue_of(seq)
        if q is not None and seq in q:
            q.remove(seq)
        self.bm.free_sequence(seq)
        self.swap.drop(seq.request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def suspend(self, seq: Sequence) -> bool:
        """Park a sequence: it leaves the pool (swapped or dropped) and is not scheduled."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._evict(seq, count=False)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.SWAPPED:
            self.swapped.remove(seq)
        else:
            return False
        seq.status = SequenceStatus.SUSPENDED
        self.suspended.append(seq)
        return True

    def resume(self, seq: Sequence) -> bool:
        if seq.status is not SequenceStatus.SUSPENDED:
            return False
        self.suspended.remove(seq)
        if seq.request_id in self.swap:
            seq.status = SequenceStatus.SWAPPED
            self.swapped.append(seq)
        else:
            seq.status = SequenceStatus.WAITING
            self.waiting.append(seq)
        seq.start_waiting(time.monotonic())
        return True

    # -- context switches -----------------------------------------------------------------
    def choose_mode(self, seq: Sequence) -> str:
        """Swap or recompute, by which is cheaper given measured copy and prefill speeds."""
        nbytes = len(seq.block_table) * self.bytes_per_block
        if self.preemption_mode == "recompute" or not seq.block_table or not self.swap.can_hold(nbytes):
            return "recompute"
        if self.preemption_mode == "swap":
            return "swap"
        swap_cost = 2 * nbytes / self.copy_bytes_per_s
        recompute_cost = seq.num_computed_tokens / self.prefill_tokens_per_s
        return "swap" if swap_cost <= recompute_cost else "recompute"

    def _evict(self, seq: Sequence, count: bool = True) -> str:
        """Move seq's KV out of the pool; returns the mode used."""
        mode = self.choose_mode(seq)
        if mode == "swap":
            t = time.perf_counter()
            data = self.read_blocks(seq.block_table)
            self.swap.put(seq.request_id, data)
            self._observe_copy(data.numel() * data.element_size(), time.perf_counter() - t)
            seq.swapped_tokens = seq.num_computed_tokens
            seq.metrics.num_swaps += 1
            seq.status = SequenceStatus.SWAPPED
        else:
            seq.status = SequenceStatus.WAITING
        self.bm.free_sequence(seq)
        seq.start_waiting(time.monotonic())
        if count:
            self.num_preemptions[mode] += 1
            seq.metrics.num_preemptions += 1
        return mode

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if self._evict(seq) == "swap":
            self.swapped.append(seq)
        else:
            self.waiting.append(seq)

    def _swap_in(self, seq: Sequence) -> bool:
        n = self.swap.entries[seq.request_id].num_blocks
        blocks = self.bm.allocate_blocks(n)
        if blocks is None:
            return False
        t = time.perf_counter()
        data = self.swap.take(seq.request_id)
        self.write_blocks(blocks, data)
        self._observe_copy(data.numel() * data.element_size(), time.perf_counter() - t)
        seq.block_table = blocks
        seq.num_computed_tokens = seq.swapped_tokens
        self.num_swap_ins += 1
        return True

    def _observe_copy(self, nbytes: int, seconds: float) -> None:
        if seconds > 0 and nbytes > (1 << 16):
            self.copy_bytes_per_s = 0.7 * self.copy_bytes_per_s + 0.3 * nbytes / seconds

    def observe_step(self, prefill_tokens: int, seconds: float) -> None:
        if prefill_tokens >= 64 and seconds > 0:
            self.prefill_tokens_per_s = 0.7 * self.prefill_tokens_per_s + 0.3 * prefill_tokens / seconds

    # -- the decision -------------------------------------------------------------------
    def _blocks_to_run(self, seq: Sequence, counted: set[int], budget: int) -> int:
        """Blocks seq would hold after running this step, not counting shared ones twice."""
        bs = self.bm.block_size
        if seq.status is SequenceStatus.RUNNING:
            fresh = [b for b in seq.block_table if b not in counted]
            counted.update(fresh)
            return len(fresh) + self.bm.blocks_needed(seq, min(seq.num_uncomputed_tokens, max(budget, 1)))
        if seq.status is SequenceStatus.SWAPPED:
            return self.swap.entries[seq.request_id].num_blocks + 1
        return -(-min(len(seq), max(budget, 1)) // bs)

    def _over_quota_first(self, victims: list[Sequence]) -> list[Sequence]:
        used = self.bm.tenant_blocks(self.running)
        def over(s: Sequence) -> bool:
            q = self.tenants.get(s.tenant).kv_quota
            return q is not None and used.get(s.tenant, 0) > q
        return sorted(victims, key=over)   # stable: over-quota tenants move to the end (taken first)

    def schedule(self) -> list[ScheduledSeq]:
        now = time.monotonic()
        order = self.policy.order(self.running + self.swapped + self.waiting, now)
        # 1. The set that should run: the longest prefix of the order that fits.
        free_blocks = self.bm.num_blocks
        counted: set[int] = set()
        tenant_used: dict[str, int] = {}
        tenant_count: dict[str, int] = {}
        target: list[Sequence] = []
        budget = self.max_num_batched_tokens
        for seq in order:
            if len(target) >= self.max_num_seqs:
                break
            need = self._blocks_to_run(seq, counted, budget)
            reserve = 0 if seq.status is SequenceStatus.RUNNING else self.watermark_blocks
            quota = self.tenants.get(seq.tenant).kv_quota
            if quota is not None and tenant_count.get(seq.tenant, 0) and tenant_used.get(seq.tenant, 0) + need > quota:
                continue   # over quota: this tenant's further sequences wait
            if need + reserve > free_blocks:
                if seq.status is SequenceStatus.RUNNING:
                    continue
                break
            free_blocks -= need
            tenant_used[seq.tenant] = tenant_used.get(seq.tenant, 0) + need
            tenant_count[seq.tenant] = tenant_count.get(seq.tenant, 0) + 1
            target.append(seq)
            if seq.status is not SequenceStatus.RUNNING:
                budget -= min(seq.num_uncomputed_tokens, budget) if seq.status is SequenceStatus.WAITING else 1
        # 2. Preempt running sequences that lost their place.
        chosen = set(map(id, target))
        for seq in reversed([s for s in order if s.status is SequenceStatus.RUNNING and id(s) not in chosen]):
            self.preempt(seq)
        # 3. Grow the running ones, most deserving first; preempt from the back if the pool runs dry.
        batch: list[ScheduledSeq] = []
        budget = self.max_num_batched_tokens
        run_order = [s for s in target if s.status is SequenceStatus.RUNNING]
        scheduled: list[Sequence] = []
        while run_order:
            seq = run_order.pop(0)
            n = min(seq.num_uncomputed_tokens, budget)
            if n == 0:
                scheduled.append(seq)
                continue
            while not self.bm.can_append(seq, n):
                victims = self._over_quota_first(run_order)
                if victims:
                    v = victims[-1]
                    run_order.remove(v)
                    self.preempt(v)
                else:
                    self.preempt(seq)
                    seq = None
                    break
            if seq is not None:
                self.bm.append_slots(seq, n)
                batch.append(ScheduledSeq(seq, n))
                scheduled.append(seq)
                budget -= n
        # 4. Bring in swapped and waiting members of the target set, in order.
        admitted: list[Sequence] = []
        for seq in target:
            if seq.status is SequenceStatus.RUNNING or budget <= 0:
                continue
            if seq.status is SequenceStatus.SWAPPED:
                if self.bm.num_free_blocks - self.swap.entries[seq.request_id].num_blocks < self.watermark_blocks:
                    break
                if not self._swap_in(seq):
                    break
                self.swapped.remove(seq)
                n = min(seq.num_uncomputed_tokens, budget)
                if not self.bm.can_append(seq, n):
                    n = 0
                else:
                    self.bm.append_slots(seq, n)
            else:
                if not self.bm.allocate_prompt(seq, budget, reserve=self.watermark_blocks):
                    break
                self.waiting.remove(seq)
                n = min(seq.num_uncomputed_tokens, budget)
            seq.status = SequenceStatus.RUNNING
            seq.stop_waiting(now)
            admitted.append(seq)
            if n:
                batch.append(ScheduledSeq(seq, n))
                budget -= n
        self.running = scheduled + admitted
        return batch
