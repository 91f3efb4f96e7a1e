"""Scheduling policies: each one only orders the sequences that want to run, most
deserving first. The scheduler turns that order into admissions and preemptions."""

from __future__ import annotations

import abc
import itertools
from collections import defaultdict

from llmos.engine.sequence import Sequence, SequenceStatus
from llmos.kernel.tenant import TenantTable


class Policy(abc.ABC):
    name = "base"

    def __init__(self, tenants: TenantTable) -> None:
        self.tenants = tenants

    @abc.abstractmethod
    def order(self, seqs: list[Sequence], now: float) -> list[Sequence]:
        """The sequences that want the machine, most deserving first."""

    def on_served(self, seq: Sequence, tokens: int) -> None:
        """Called after a step computed `tokens` tokens for seq."""


class FCFS(Policy):
    name = "fcfs"

    def order(self, seqs, now):
        return sorted(seqs, key=lambda s: (s.arrival_time, s.seq_no))


class PriorityPolicy(Policy):
    """Strict priority (lower runs first) with aging: every second spent waiting improves a
    request's effective priority by `aging_rate`, so nothing starves. A running request
    keeps its place until a waiting one is better by more than `hysteresis` levels, so
    requests of equal priority do not swap places every step as their waiting ages."""
    name = "priority"

    def __init__(self, tenants, aging_rate: float = 0.1, hysteresis: float = 0.5) -> None:
        super().__init__(tenants)
        self.aging_rate = aging_rate
        self.hysteresis = hysteresis

    def effective(self, seq: Sequence, now: float) -> float:
        bonus = self.hysteresis if seq.status is SequenceStatus.RUNNING else 0.0
        return seq.priority - self.aging_rate * seq.waited(now) - bonus

    def order(self, seqs, now):
        return sorted(seqs, key=lambda s: (self.effective(s, now), s.arrival_time, s.seq_no))


class RoundRobin(Policy):
    """Each running sequence runs for `quantum` tokens, then goes to the back of the line."""
    name = "rr"

    def __init__(self, tenants, quantum: int = 32) -> None:
        super().__init__(tenants)
        self.quantum = quantum
        self._stamps = itertools.count(1)

    def order(self, seqs, now):
        for s in seqs:
            if s.rr_stamp == 0:
                s.rr_stamp = next(self._stamps)
        return sorted(seqs, key=lambda s: s.rr_stamp)

    def on_served(self, seq, tokens):
        seq.quantum_used += tokens
        if seq.quantum_used >= self.quantum:
            seq.quantum_used = 0
            seq.rr_stamp = next(self._stamps)


class FairShare(Policy):
    """Weighted fair sharing by virtual token counters. A tenant's counter grows by the
    tokens it is served divided by its weight; batch slots go to the tenants with the lowest
    counters, each further slot of a tenant counting as if one more token per step had been
    served. A running sequence keeps its slot unless another tenant is behind by more than
    `stickiness` tokens, so slots do not flap between tenants every step."""
    name = "fair"

    def __init__(self, tenants, stickiness: float = 8.0) -> None:
        super().__init__(tenants)
        self.stickiness = stickiness

    def order(self, seqs, now):
        by_tenant: dict[str, list[Sequence]] = defaultdict(list)
        for s in seqs:
            by_tenant[s.tenant].append(s)
        keyed = []
        for name, group in by_tenant.items():
            t = self.tenants.get(name)
            group.sort(key=lambda s: (s.status is not SequenceStatus.RUNNING, s.arrival_time, s.seq_no))
            for rank, s in enumerate(group):
                key = t.vtime + rank / t.weight
                if s.status is SequenceStatus.RUNNING:
                    key -= self.stickiness / t.weight
                keyed.append((key, s.arrival_time, s.seq_no, s))
        keyed.sort(key=lambda k: k[:3])
        return [k[3] for k in keyed]

    def on_served(self, seq, tokens):
        t = self.tenants.get(seq.tenant)
        t.vtime += tokens / t.weight

    def lift(self, tenant_name: str, backlogged: set[str]) -> None:
        """A tenant coming back from idle starts at the current minimum: idleness earns no credit."""
        others = [self.tenants.get(n).vtime for n in backlogged if n != tenant_name]
        if others:
            t = self.tenants.get(tenant_name)
            t.vtime = max(t.vtime, min(others))


POLICIES = {"fcfs": FCFS, "priority": PriorityPolicy, "rr": RoundRobin, "fair": FairShare}
