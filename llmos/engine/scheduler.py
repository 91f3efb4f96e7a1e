"""Iteration-level scheduler: every step decides which sequences run and how many tokens each.

Running sequences go first (a decode costs one token of the step's budget, an unfinished
prompt as many as remain, up to the budget: that is chunked prefill); then waiting ones are
admitted while the budget, the batch bound and the KV pool allow. When the pool cannot
hold a running sequence's next tokens, the least deserving running sequence is preempted
(its blocks dropped, to be recomputed when it is readmitted) rather than failing.
"""

from __future__ import annotations

from collections import deque

from llmos.engine.block_manager import BlockManager
from llmos.engine.model_runner import ScheduledSeq
from llmos.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 watermark: float = 0.01) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Admission leaves this many blocks free so the running sequences can keep growing.
        self.watermark_blocks = max(1, int(watermark * block_manager.num_blocks))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_sequence(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def preempt(self, seq: Sequence) -> None:
        self.bm.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        queue = list(self.running)
        running: list[Sequence] = []
        preempted = False
        while queue:
            seq = queue.pop(0)
            n = min(seq.num_uncomputed_tokens, budget)
            if n == 0:
                running.append(seq)
                continue
            while not self.bm.can_append(seq, n):
                preempted = True
                if queue:
                    self.preempt(queue.pop())
                else:
                    self.preempt(seq)
                    seq = None
                    break
            if seq is not None:
                self.bm.append_slots(seq, n)
                batch.append(ScheduledSeq(seq, n))
                running.append(seq)
                budget -= n
        while not preempted and self.waiting and budget > 0 and len(running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.bm.allocate_prompt(seq, budget, reserve=self.watermark_blocks):
                break
            self.waiting.popleft()
            n = min(seq.num_uncomputed_tokens, budget)
            seq.status = SequenceStatus.RUNNING
            running.append(seq)
            batch.append(ScheduledSeq(seq, n))
            budget -= n
        self.running = running
        return batch
