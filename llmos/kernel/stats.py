"""The kernel's statistics as typed plain data: what `LLM.stats()` returns, what the
server's kernel API and Prometheus exporter read. Fields are the contract; add, never rename."""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> HistogramSnapshot:
        cumulative, acc = {}, 0
        for b, c in zip(list(self.buckets) + [float("inf")], self.counts):
            acc += c
            cumulative[b] = acc
        return HistogramSnapshot(self.count, self.sum, cumulative, self.sum / self.count if self.count else None)


@dataclass
class HistogramSnapshot:
    count: int
    sum: float
    buckets: dict[float, int]          # upper bound -> cumulative count (the last is +inf)
    mean: float | None


@dataclass
class TenantStats:
    weight: float
    kv_quota: int | None
    max_waiting: int | None
    tokens_served: int
    prompt_tokens: int
    output_tokens: int
    virtual_time: float
    kv_blocks: int


@dataclass
class TokenCounts:
    prompt: int
    generated: int


@dataclass
class SwapStats:
    bytes_out: int
    bytes_in: int
    host_bytes: int
    disk_bytes: int
    host_budget: int
    compressed_entries: int
    bytes_saved_by_compression: int
    swap_ins: int


@dataclass
class KVBlockStats:
    total: int
    used: int
    free: int
    cached: int
    block_size: int
    swapped: int
    compressed: int


@dataclass
class PrefixCacheStats:
    queries: int
    hits: int
    hit_rate: float
    restored: int = 0         # hits copied back from host memory (the second tier), not found in the pool
    spilled: int = 0          # cached blocks moved to host memory when the pool reused them


@dataclass
class CostModel:
    copy_bytes_per_s: float
    prefill_tokens_per_s: float


@dataclass
class KernelStats:
    requests: dict[str, int]                          # state -> count
    requests_by_tenant: dict[str, dict[str, int]]     # state -> tenant -> count
    tenants: dict[str, TenantStats]
    tokens: TokenCounts
    steps: int
    preemptions: dict[str, int]                       # mode -> count
    swap: SwapStats
    kv_blocks: KVBlockStats
    prefix_cache: PrefixCacheStats
    scheduling_policy: str
    cost_model: CostModel
    histograms: dict[str, dict[str, HistogramSnapshot]] = field(default_factory=dict)   # name -> tenant -> h
    # Per agent process (by pid): prompt tokens computed (prefix-cache hits are free) and
    # tokens generated, the tokens fair sharing charges it for.
    process_tokens: dict[int, TokenCounts] = field(default_factory=dict)
    # The engine's weights and compute paths (filled in by the engine: the kernel knows no
    # tensors): compute setting, weight types and bytes, crossover, steps per path.
    compute: dict = field(default_factory=dict)

    def for_tenant(self, tenant: str) -> KernelStats:
        """The view a tenant may see: machine-wide totals, and only its own row where stats
        are per tenant."""
        return dataclasses.replace(
            self,
            requests_by_tenant={k: {t: n for t, n in v.items() if t == tenant} for k, v in self.requests_by_tenant.items()},
            tenants={t: v for t, v in self.tenants.items() if t == tenant},
            histograms={k: {t: v for t, v in per.items() if t == tenant} for k, per in self.histograms.items()},
            process_tokens={})   # by pid alone it cannot tell whose; the agent API has each process's usage

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class BlockOwner:
    request_id: str | None
    tenant: str | None


@dataclass
class SwapSlot:
    request_id: str
    tenant: str
    blocks: int
    where: str                # "host" | "disk"
    compressed: bool


@dataclass
class MemoryMap:
    """The KV pool block by block and the swap tier beside it: the picture of who holds
    memory that the dashboard draws. `blocks[i]` is -1 for a free block, -2 for a free
    block still holding a reusable cached prefix, else an index into `owners` (a block
    shared by several requests names the first; `shared` lists those blocks)."""
    total: int
    block_size: int
    block_bytes: int
    blocks: list[int]
    owners: list[BlockOwner]
    shared: list[int]
    swap: list[SwapSlot]
    swap_host_bytes: int
    swap_host_budget: int
    swap_disk_bytes: int
    prefix_blocks: int        # cached prefix blocks kept in host memory (the second tier)

    def for_tenant(self, tenant: str) -> MemoryMap:
        """A tenant sees that the pool is used, but only its own requests by name."""
        hidden = BlockOwner(None, None)
        return dataclasses.replace(
            self, owners=[o if o.tenant == tenant else hidden for o in self.owners],
            swap=[s for s in self.swap if s.tenant == tenant])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def merge_stats(parts: list[KernelStats]) -> KernelStats:
    """One cluster's statistics from its replicas': counts and bytes add up, per-tenant rows
    and histograms merge bucket by bucket, rates average. Each replica's own stays readable
    from the cluster (`replica_stats`)."""
    if not parts:
        raise ValueError("merge_stats: no replicas")

    def add(rows: list[dict]) -> dict:
        out: dict = {}
        for row in rows:
            for k, v in row.items():
                out[k] = out.get(k, 0) + v
        return out

    tenants: dict[str, TenantStats] = {}
    for p in parts:
        for name, t in p.tenants.items():
            if name not in tenants:
                tenants[name] = dataclasses.replace(t)
                continue
            m = tenants[name]
            for f in ("tokens_served", "prompt_tokens", "output_tokens", "kv_blocks"):
                setattr(m, f, getattr(m, f) + getattr(t, f))
            m.virtual_time = max(m.virtual_time, t.virtual_time)
    hists: dict[str, dict[str, HistogramSnapshot]] = {}
    for p in parts:
        for name, per in p.histograms.items():
            for tenant, h in per.items():
                old = hists.setdefault(name, {}).get(tenant)
                hists[name][tenant] = h if old is None else HistogramSnapshot(
                    old.count + h.count, old.sum + h.sum, {b: c + h.buckets.get(b, 0) for b, c in old.buckets.items()},
                    (old.sum + h.sum) / (old.count + h.count) if old.count + h.count else None)
    by_tenant = {state: add([p.requests_by_tenant.get(state, {}) for p in parts])
                 for state in {s for p in parts for s in p.requests_by_tenant}}
    queries, hits = sum(p.prefix_cache.queries for p in parts), sum(p.prefix_cache.hits for p in parts)
    first = parts[0]
    return KernelStats(
        requests=add([p.requests for p in parts]),
        requests_by_tenant=by_tenant,
        tenants=tenants,
        tokens=TokenCounts(sum(p.tokens.prompt for p in parts), sum(p.tokens.generated for p in parts)),
        steps=sum(p.steps for p in parts),
        preemptions=add([p.preemptions for p in parts]),
        swap=SwapStats(**add([dataclasses.asdict(p.swap) for p in parts])),
        kv_blocks=KVBlockStats(**{**add([dataclasses.asdict(p.kv_blocks) for p in parts]),
                                  "block_size": first.kv_blocks.block_size}),
        prefix_cache=PrefixCacheStats(queries, hits, hits / queries if queries else 0.0,
                                      sum(p.prefix_cache.restored for p in parts),
                                      sum(p.prefix_cache.spilled for p in parts)),
        scheduling_policy=first.scheduling_policy,
        cost_model=CostModel(sum(p.cost_model.copy_bytes_per_s for p in parts) / len(parts),
                             sum(p.cost_model.prefill_tokens_per_s for p in parts) / len(parts)),
        histograms=hists,
        process_tokens={pid: TokenCounts(*(sum(getattr(p.process_tokens[pid], f) for p in parts
                                               if pid in p.process_tokens) for f in ("prompt", "generated")))
                        for pid in {pid for p in parts for pid in p.process_tokens}},
        compute={**first.compute, "steps": add([p.compute.get("steps", {}) for p in parts]),
                 "weight_bytes": sum(p.compute.get("weight_bytes", 0) for p in parts),
                 "panel_bytes": sum(p.compute.get("panel_bytes", 0) for p in parts)} if first.compute else {})


def merge_maps(maps: list[MemoryMap]) -> MemoryMap:
    """A cluster's KV pools side by side, replica after replica, as one map."""
    blocks, owners, shared, offset = [], [], [], 0
    for m in maps:
        base = len(owners)
        blocks.extend(b + base if b >= 0 else b for b in m.blocks)
        owners.extend(m.owners)
        shared.extend(b + offset for b in m.shared)
        offset += m.total
    first = maps[0]
    return MemoryMap(offset, first.block_size, first.block_bytes, blocks, owners, shared,
                     [s for m in maps for s in m.swap], sum(m.swap_host_bytes for m in maps),
                     sum(m.swap_host_budget for m in maps), sum(m.swap_disk_bytes for m in maps),
                     sum(m.prefix_blocks for m in maps))
