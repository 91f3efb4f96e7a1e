"""Iteration-level scheduler: every step it decides which sequences run and for how many
tokens, and performs the context switches that decision needs.

Each step the policy orders every sequence that wants the machine (running, swapped out,
waiting), most deserving first. The scheduler walks that order and keeps the longest
prefix that fits the batch bound, the KV pool and the tenants' quotas: that is the set
that should be running. A running sequence outside it is preempted (`ContextSwitcher`:
swapped out or dropped for recompute, whichever is cheaper) and a sequence inside it is
swapped back in or admitted. Decodes cost one token of the step's budget; prompts take
what remains of it (chunked prefill).
"""

from __future__ import annotations

import time
from collections import deque

from llmos.kernel.block_manager import BlockManager
from llmos.kernel.context_switch import ContextSwitcher
from llmos.kernel.policy import FairShare, Policy
from llmos.kernel.request import ScheduledSeq, Sequence, SequenceStatus
from llmos.kernel.tenant import TenantTable


class Scheduler:
    def __init__(self, block_manager: BlockManager, policy: Policy, tenants: TenantTable,
                 switcher: ContextSwitcher, *, max_num_seqs: int, max_num_batched_tokens: int,
                 watermark: float = 0.01) -> None:
        self.bm = block_manager
        self.policy = policy
        self.tenants = tenants
        self.switcher = switcher
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Admission leaves this many blocks free so the running sequences can keep growing.
        self.watermark_blocks = max(1, int(watermark * block_manager.num_blocks))
        self.running: list[Sequence] = []
        self.waiting: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self.suspended: list[Sequence] = []
        self._seq_no = 0

    # -- queues -----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self._seq_no += 1
        seq.seq_no = self._seq_no
        seq.status = SequenceStatus.WAITING
        seq.start_waiting(time.monotonic())
        if isinstance(self.policy, FairShare):
            self.policy.lift(seq, self.running + self.waiting + self.swapped)
        self.waiting.append(seq)

    def _queue_of(self, seq: Sequence) -> list[Sequence] | None:
        return {SequenceStatus.RUNNING: self.running, SequenceStatus.WAITING: self.waiting,
                SequenceStatus.SWAPPED: self.swapped, SequenceStatus.SUSPENDED: self.suspended}.get(seq.status)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of every queue; its blocks return at once."""
        q = self._queue_of(seq)
        if q is not None and seq in q:
            q.remove(seq)
        self.bm.free_sequence(seq)
        self.switcher.swap.drop(seq.request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def num_queued(self, tenant: str) -> int:
        """Requests of the tenant waiting that have not started (the bounded admission queue)."""
        return sum(1 for s in self.waiting if s.tenant == tenant and s.num_computed_tokens == 0)

    def suspend(self, seq: Sequence) -> bool:
        """Park a sequence: it leaves the pool (swapped or dropped) and is not scheduled."""
        q = self._queue_of(seq)
        if q is None or q is self.suspended:
            return False
        q.remove(seq)
        if q is self.running:
            self.switcher.swap_out(seq, count=False)
        seq.status = SequenceStatus.SUSPENDED
        self.suspended.append(seq)
        return True

    def resume(self, seq: Sequence) -> bool:
        if seq.status is not SequenceStatus.SUSPENDED:
            return False
        self.suspended.remove(seq)
        if seq.request_id in self.switcher.swap:
            seq.status = SequenceStatus.SWAPPED
            self.swapped.append(seq)
        else:
            seq.status = SequenceStatus.WAITING
            self.waiting.append(seq)
        seq.start_waiting(time.monotonic())
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if self.switcher.swap_out(seq) == "swap":
            self.swapped.append(seq)
        else:
            self.waiting.append(seq)

    # -- the decision -------------------------------------------------------------------
    def schedule(self) -> list[ScheduledSeq]:
        """This step's batch: pick the set that should run, preempt the rest, grow the
        running ones, admit the others."""
        now = time.monotonic()
        order = self.policy.order(self.running + self.swapped + self.waiting, now)
        target = self._target_set(order)
        chosen = {s.request_id for s in target}
        for seq in reversed([s for s in order if s.status is SequenceStatus.RUNNING and s.request_id not in chosen]):
            self.preempt(seq)
        budget = self.max_num_batched_tokens
        batch, kept, budget = self._grow_running([s for s in target if s.status is SequenceStatus.RUNNING], budget)
        admitted = self._admit([s for s in target if s.status is not SequenceStatus.RUNNING], budget, batch, now)
        self.running = kept + admitted
        return batch

    def _blocks_to_run(self, seq: Sequence, counted: set[int], budget: int) -> int:
        """Blocks seq would hold after running this step, not counting shared ones twice."""
        if seq.status is SequenceStatus.RUNNING:
            fresh = [b for b in seq.block_table if b not in counted]
            counted.update(fresh)
            return len(fresh) + self.bm.blocks_needed(seq, min(seq.num_uncomputed_tokens, max(budget, 1)))
        if seq.status is SequenceStatus.SWAPPED:
            return self.switcher.swapped_blocks(seq) + 1
        return -(-min(len(seq), max(budget, 1)) // self.bm.block_size)

    def _target_set(self, order: list[Sequence]) -> list[Sequence]:
        """The longest prefix of the policy's order that fits the batch, the pool and the
        quotas (a tenant over quota is skipped, a running sequence that does not fit too)."""
        free_blocks = self.bm.num_blocks
        counted: set[int] = set()
        tenant_used: dict = {}      # tenant, and (tenant, group), -> blocks
        target: list[Sequence] = []
        budget = self.max_num_batched_tokens
        for seq in order:
            if len(target) >= self.max_num_seqs:
                break
            running = seq.status is SequenceStatus.RUNNING
            need = self._blocks_to_run(seq, counted, budget)
            quota = self.tenants.get(seq.tenant).kv_quota
            used = tenant_used.get(seq.tenant)
            if quota is not None and used is not None and used + need > quota:
                continue
            group_used = tenant_used.get((seq.tenant, seq.group))
            if seq.group_kv_quota is not None and group_used is not None and group_used + need > seq.group_kv_quota:
                continue
            if need + (0 if running else self.watermark_blocks) > free_blocks:
                if running:
                    continue
                break
            free_blocks -= need
            tenant_used[seq.tenant] = (used or 0) + need
            tenant_used[(seq.tenant, seq.group)] = (group_used or 0) + need
            target.append(seq)
            if seq.status is SequenceStatus.WAITING:
                budget -= min(seq.num_uncomputed_tokens, budget)
            elif not running:
                budget -= 1
        return target

    def _over_quota_first(self, victims: deque[Sequence]) -> list[Sequence]:
        used = self.bm.tenant_blocks(self.running)

        def over(s: Sequence) -> bool:
            q = self.tenants.get(s.tenant).kv_quota
            return q is not None and used.get(s.tenant, 0) > q
        return sorted(victims, key=over)   # stable: over-quota tenants move to the end (taken first)

    def _grow_running(self, run_order: list[Sequence], budget: int
                      ) -> tuple[list[ScheduledSeq], list[Sequence], int]:
        """Give each running member of the target set its tokens, most deserving first;
        when the pool runs dry, preempt from the back (over-quota tenants first)."""
        batch: list[ScheduledSeq] = []
        kept: list[Sequence] = []
        queue = deque(run_order)
        while queue:
            seq = queue.popleft()
            n = min(seq.num_uncomputed_tokens, budget)
            if n == 0:
                kept.append(seq)
                continue
            while not self.bm.can_append(seq, n) and queue:
                victim = self._over_quota_first(queue)[-1]
                queue.remove(victim)
                self.preempt(victim)
            if not self.bm.can_append(seq, n):
                self.preempt(seq)
                continue
            self.bm.append_slots(seq, n)
            batch.append(ScheduledSeq(seq, n))
            kept.append(seq)
            budget -= n
        return batch, kept, budget

    def _admit(self, incoming: list[Sequence], budget: int, batch: list[ScheduledSeq], now: float
               ) -> list[Sequence]:
        """Swap in or start the swapped and waiting members of the target set, in order,
        until the budget or the pool (above the watermark) runs out."""
        admitted: list[Sequence] = []
        for seq in incoming:
            if budget <= 0:
                break
            if seq.status is SequenceStatus.SWAPPED:
                if self.bm.num_free_blocks - self.switcher.swapped_blocks(seq) < self.watermark_blocks:
                    break
                if not self.switcher.swap_in(seq):
                    break
                self.swapped.remove(seq)
                n = min(seq.num_uncomputed_tokens, budget)
                if self.bm.can_append(seq, n):
                    self.bm.append_slots(seq, n)
                else:
                    n = 0
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
        return admitted

    # -- after the step ------------------------------------------------------------------
    def complete_step(self, batch: list[ScheduledSeq], seconds: float) -> int:
        """The forward pass computed the batch: advance each sequence, name the blocks that
        filled up (prefix cache), charge the policy, feed the cost model. Returns the
        number of prompt tokens computed."""
        prefill = 0
        for item in batch:
            seq = item.seq
            start = seq.num_computed_tokens
            seq.num_computed_tokens += item.num_new_tokens
            self.bm.register_full_blocks(seq, start)
            if item.is_prefill:
                prefill += item.num_new_tokens
            self.policy.on_served(seq, item.num_new_tokens)
        self.switcher.observe_prefill(prefill, seconds)
        return prefill
