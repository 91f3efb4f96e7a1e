"""Scheduling policies: each one only orders the sequences that want to run, most
deserving first. The scheduler turns that order into admissions and preemptions."""

from __future__ import annotations

import abc
import itertools
from collections import defaultdict

from llmos.kernel.request import Sequence, SequenceStatus
from llmos.kernel.tenant import Tenant, TenantTable


class Policy(abc.ABC):
    name = "base"

    def __init__(self, tenants: TenantTable) -> None:
        self.tenants = tenants

    @staticmethod
    def from_config(config, tenants: TenantTable) -> Policy:
        """The policy an EngineConfig names, with its settings."""
        name = config.scheduling_policy
        if name == "priority":
            return PriorityPolicy(tenants, aging_rate=config.aging_rate)
        if name == "rr":
            return RoundRobin(tenants, quantum=config.rr_quantum)
        return POLICIES[name](tenants)

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
    """Hierarchical weighted fair sharing by virtual token counters: tenants share the
    machine by their weights, and inside a tenant its groups (agent processes; a tenant's
    own plain requests form one group) share the tenant's part by theirs.

    A counter grows by the tokens served divided by the weight; slots go to the lowest
    counters, each further slot of a tenant (of a group) counting as if one more token per
    step had been served. A running sequence keeps its slot unless another is behind by
    more than `stickiness` tokens, so slots do not flap every step."""
    name = "fair"

    def __init__(self, tenants, stickiness: float = 8.0) -> None:
        super().__init__(tenants)
        self.stickiness = stickiness

    def _keyed(self, seqs: list[Sequence], vtime: float, weight: float) -> list[tuple[float, float, int, Sequence]]:
        seqs = sorted(seqs, key=lambda s: (s.status is not SequenceStatus.RUNNING, s.arrival_time, s.seq_no))
        out = []
        for rank, s in enumerate(seqs):
            key = vtime + rank / weight
            if s.status is SequenceStatus.RUNNING:
                key -= self.stickiness / weight
            out.append((key, s.arrival_time, s.seq_no, s))
        return out

    def _within(self, t: Tenant, seqs: list[Sequence]) -> list[Sequence]:
        """The tenant's sequences in the order its groups' fair shares give them."""
        by_group: dict[str | None, list[Sequence]] = defaultdict(list)
        for s in seqs:
            by_group[s.group].append(s)
        if len(by_group) == 1:
            return [k[3] for k in self._keyed(seqs, 0.0, 1.0)]
        keyed = []
        for group, members in by_group.items():
            weight = members[0].weight if group is not None else 1.0
            keyed.extend(self._keyed(members, t.group_vtime.get(group, 0.0), weight))
        keyed.sort(key=lambda k: k[:3])
        return [k[3] for k in keyed]

    def order(self, seqs, now):
        by_tenant: dict[str, list[Sequence]] = defaultdict(list)
        for s in seqs:
            by_tenant[s.tenant].append(s)
        keyed = []
        for name, group in by_tenant.items():
            t = self.tenants.get(name)
            for rank, s in enumerate(self._within(t, group)):
                key = t.vtime + rank / t.weight
                if s.status is SequenceStatus.RUNNING:
                    key -= self.stickiness / t.weight
                keyed.append((key, s.arrival_time, s.seq_no, s))
        keyed.sort(key=lambda k: k[:3])
        return [k[3] for k in keyed]

    def on_served(self, seq, tokens):
        t = self.tenants.get(seq.tenant)
        t.vtime += tokens / t.weight
        weight = seq.weight if seq.group is not None else 1.0
        t.group_vtime[seq.group] = t.group_vtime.get(seq.group, 0.0) + tokens / weight

    def lift(self, seq: Sequence, active: list[Sequence]) -> None:
        """A tenant (a group) coming back from idle starts at the current minimum of those
        still backlogged: idleness earns no credit."""
        t = self.tenants.get(seq.tenant)
        if not any(s.tenant == seq.tenant for s in active):
            others = [self.tenants.get(s.tenant).vtime for s in active]
            if others:
                t.vtime = max(t.vtime, min(others))
        if not any(s.tenant == seq.tenant and s.group == seq.group for s in active):
            peers = [t.group_vtime.get(s.group, 0.0) for s in active if s.tenant == seq.tenant]
            if peers:
                t.group_vtime[seq.group] = max(t.group_vtime.get(seq.group, 0.0), min(peers))


POLICIES = {"fcfs": FCFS, "priority": PriorityPolicy, "rr": RoundRobin, "fair": FairShare}
