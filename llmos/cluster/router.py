"""The cluster's router: which replica runs a request, and which queued request goes next.

Placement weighs two things. A replica that already served the same leading prompt blocks
holds them in its prefix cache, so sending the request there saves their prefill (the
router keys blocks by the same chained hash the replicas' block managers use). But a
cache hit is worth less than a queue: the replica with the longest match wins only while
its load is within `affinity_slack` requests of the least loaded one. A conversation or an
agent (the request's session: its user, or its process) stays on its replica while that
holds, since its next turn extends the prompt just cached there.

Fairness across replicas: each replica runs at most `max_inflight` requests; the rest wait
here, in one queue per tenant, and leave in order of the tenant's global virtual time
(tokens it was served on any replica, divided by its weight) -- the same weighted fair
share the single-engine kernel computes, counted once for the whole cluster. Within a
tenant, lower priority numbers go first, then arrival order. A request moved off a dead
replica goes before everything else."""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from llmos.errors import InvalidRequestError
from llmos.kernel.block_manager import block_hash

AFFINITY_BLOCKS = 64          # leading blocks of a prompt the router remembers per replica
MAX_PREFIXES = 200_000        # block hashes remembered per replica (LRU)
MAX_SESSIONS = 100_000
# affinity: prefix cache and sessions balanced against load; round_robin: the next open
# replica in turn, the baseline the affinity router is measured against.
POLICIES = ("affinity", "round_robin")


@dataclass
class ReplicaLoad:
    alive: bool = False
    draining: bool = False
    inflight: int = 0         # requests the router has running there
    kv_used: int = 0
    kv_total: int = 1


@dataclass(order=True)
class Queued:
    priority: int
    seq: int
    item: object = field(compare=False)


class Router:
    def __init__(self, block_size: int, max_inflight: int, affinity_slack: int = 4, policy: str = "affinity") -> None:
        if policy not in POLICIES:
            raise InvalidRequestError(f"routing: expected one of {list(POLICIES)}, got {policy!r}")
        self.policy = policy
        self._turn = itertools.count()
        self.block_size = block_size
        self.max_inflight = max_inflight
        self.affinity_slack = affinity_slack
        self.replicas: dict[int, ReplicaLoad] = {}
        self._prefixes: dict[int, OrderedDict[int, None]] = {}
        self._sessions: OrderedDict[str, int] = OrderedDict()
        self._queues: dict[str, list[Queued]] = {}
        self._urgent: deque = deque()
        self._seq = itertools.count()
        self.vtime: dict[str, float] = {}
        self.active: dict[str, int] = {}    # requests per tenant queued or running, anywhere
        self.weights: dict[str, float] = {}
        self.routed = 0
        self.affinity_routed = 0      # placed on a replica that had its leading blocks
        self.matched_blocks = 0       # leading blocks found on the chosen replica
        self.queried_blocks = 0

    # -- replicas ---------------------------------------------------------------------------
    def add_replica(self, index: int) -> None:
        self.replicas.setdefault(index, ReplicaLoad())
        self._prefixes.setdefault(index, OrderedDict())

    def remove_replica(self, index: int) -> None:
        self.replicas.pop(index, None)
        self._prefixes.pop(index, None)

    def replica_lost(self, index: int) -> None:
        """A replica died: its cache died with it."""
        if index in self.replicas:
            self.replicas[index].alive = False
            self.replicas[index].inflight = 0
            self._prefixes[index] = OrderedDict()

    # -- placement ---------------------------------------------------------------------------
    def prefix_hashes(self, token_ids: list[int], salt: object = None) -> list[int]:
        hashes, prev = [], None if salt is None else hash(("salt", salt))
        full = min(len(token_ids) // self.block_size, AFFINITY_BLOCKS)
        for i in range(full):
            prev = block_hash(prev, token_ids[i * self.block_size:(i + 1) * self.block_size])
            hashes.append(prev)
        return hashes

    def _load(self, index: int) -> float:
        r = self.replicas[index]
        return r.inflight + r.kv_used / max(1, r.kv_total)

    def _matched(self, index: int, hashes: list[int]) -> int:
        known, n = self._prefixes[index], 0
        for h in hashes:
            if h not in known:
                break
            n += 1
        return n

    def open_replicas(self, exclude: set[int] = frozenset()) -> list[int]:
        return [i for i, r in self.replicas.items()
                if r.alive and not r.draining and r.inflight < self.max_inflight and i not in exclude]

    def place(self, hashes: list[int], session: str | None, exclude: set[int] = frozenset()) -> int | None:
        """The replica for a request with these leading block hashes, or None if all are full."""
        open_ = self.open_replicas(exclude)
        if not open_:
            return None
        least = min(self._load(i) for i in open_)
        near = [i for i in open_ if self._load(i) <= least + self.affinity_slack]
        sticky = self._sessions.get(session) if session else None
        if self.policy == "round_robin":
            choice = sorted(open_)[next(self._turn) % len(open_)]
        elif sticky in near:
            choice = sticky
        else:
            best = max(near, key=lambda i: (self._matched(i, hashes), -self._load(i), -i))
            choice = best if self._matched(best, hashes) else min(open_, key=lambda i: (self._load(i), i))
        matched = self._matched(choice, hashes)
        self.routed += 1
        self.queried_blocks += len(hashes)
        self.matched_blocks += matched
        self.affinity_routed += bool(matched)
        self._remember(choice, hashes, session)
        self.replicas[choice].inflight += 1
        return choice

    def _remember(self, index: int, hashes: list[int], session: str | None) -> None:
        known = self._prefixes[index]
        for h in hashes:
            known[h] = None
            known.move_to_end(h)
        while len(known) > MAX_PREFIXES:
            known.popitem(last=False)
        if session:
            self._sessions[session] = index
            self._sessions.move_to_end(session)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)

    def done(self, index: int) -> None:
        r = self.replicas.get(index)
        if r is not None and r.inflight > 0:
            r.inflight -= 1

    # -- the global fair queue -------------------------------------------------------------
    def set_weight(self, tenant: str, weight: float) -> None:
        self.weights[tenant] = max(1e-6, float(weight))

    def charge(self, tenant: str, tokens: int) -> None:
        self.vtime[tenant] = self.vtime.get(tenant, 0.0) + tokens / self.weights.get(tenant, 1.0)

    def queued(self, tenant: str | None = None) -> int:
        if tenant is not None:
            return len(self._queues.get(tenant, ()))
        return len(self._urgent) + sum(len(q) for q in self._queues.values())

    def tenants_queued(self) -> list[str]:
        return [t for t, q in self._queues.items() if q]

    def enqueue(self, item, tenant: str, priority: int, urgent: bool = False) -> None:
        if urgent:
            self._urgent.append(item)
            return
        q = self._queues.setdefault(tenant, [])
        if not self.active.get(tenant):
            # a tenant back from idle starts at the clock of those still busy: idleness earns no credit
            busy = [self.vtime.get(t, 0.0) for t, n in self.active.items() if n and t != tenant]
            if busy:
                self.vtime[tenant] = max(self.vtime.get(tenant, 0.0), min(busy))
        self.active[tenant] = self.active.get(tenant, 0) + 1
        q.append(Queued(priority, next(self._seq), item))
        q.sort()

    def finished(self, tenant: str) -> None:
        """A request of the tenant ended (it had been enqueued once)."""
        if self.active.get(tenant):
            self.active[tenant] -= 1

    def remove(self, item, tenant: str) -> bool:
        if item in self._urgent:
            self._urgent.remove(item)
            return True
        q = self._queues.get(tenant, [])
        for i, e in enumerate(q):
            if e.item is item:
                del q[i]
                return True
        return False

    def reprioritize(self, item, tenant: str, priority: int) -> None:
        if self.remove(item, tenant):
            self._queues[tenant].append(Queued(priority, next(self._seq), item))
            self._queues[tenant].sort()

    def pop(self, ready=lambda item: True):
        """The next request to dispatch: moved ones first, then the tenant furthest behind
        its fair share. `ready` skips requests that may not run yet (suspended)."""
        for i, item in enumerate(self._urgent):
            if ready(item):
                del self._urgent[i]
                return item
        order = sorted((self.vtime.get(t, 0.0), t) for t, q in self._queues.items() if q)
        for _, tenant in order:
            q = self._queues[tenant]
            for i, e in enumerate(q):
                if ready(e.item):
                    del q[i]
                    return e.item
        return None
