"""Accounting: what the kernel counts as work is done — tokens per tenant and per agent
process, steps, latency histograms — and the assembly of `KernelStats` from the counters
and the state of the scheduler, the KV pool and the swap tier."""

from __future__ import annotations

import threading
from collections import defaultdict

from llmos.kernel.request import ScheduledSeq, Sequence
from llmos.kernel.scheduler import Scheduler
from llmos.kernel.stats import (CostModel, Histogram, KernelStats, KVBlockStats, PrefixCacheStats, SwapStats,
                                TenantStats, TokenCounts)
from llmos.kernel.tenant import TenantTable


class Accounting:
    def __init__(self, tenants: TenantTable) -> None:
        self.tenants = tenants
        self.num_steps = 0
        self.tokens_prefilled = 0
        self.tokens_generated = 0
        # Per agent process: [prompt tokens, output tokens]; read by the process table.
        self.process_tokens: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        self._lock = threading.Lock()
        self._histograms: dict[str, dict[str, Histogram]] = defaultdict(lambda: defaultdict(Histogram))

    def observe(self, name: str, tenant: str, value: float) -> None:
        with self._lock:
            self._histograms[name][tenant].observe(value)

    def on_step(self, batch: list[ScheduledSeq], prefill_tokens: int) -> None:
        self.num_steps += 1
        self.tokens_prefilled += prefill_tokens
        for item in batch:
            tenant = self.tenants.get(item.seq.tenant)
            if item.is_prefill:
                tenant.prompt_tokens += item.num_new_tokens
                if item.seq.owner_pid is not None:
                    self.process_tokens[item.seq.owner_pid][0] += item.num_new_tokens
            tenant.tokens_served += item.num_new_tokens

    def on_token(self, seq: Sequence, now: float) -> None:
        """One generated token: counters, and the request's latency metrics."""
        self.tokens_generated += 1
        self.tenants.get(seq.tenant).output_tokens += 1
        if seq.owner_pid is not None:
            self.process_tokens[seq.owner_pid][1] += 1
        m = seq.metrics
        if m.first_token_time is None:
            m.first_token_time = now
            m.num_cached_tokens = seq.num_cached_tokens
            self.observe("time_to_first_token_seconds", seq.tenant, now - m.arrival_time)
            if m.first_scheduled_time is not None:
                self.observe("queue_time_seconds", seq.tenant, m.first_scheduled_time - m.arrival_time)
        else:
            self.observe("inter_token_latency_seconds", seq.tenant, now - m.last_token_time)
        m.last_token_time = now
        m.num_output_tokens += 1

    def snapshot(self, scheduler: Scheduler, policy_name: str) -> KernelStats:
        sch, bm = scheduler, scheduler.bm
        sw, swap = scheduler.switcher, scheduler.switcher.swap
        by_state: dict[str, dict[str, int]] = {}
        for name, q in (("waiting", sch.waiting), ("running", sch.running), ("swapped", sch.swapped),
                        ("suspended", sch.suspended)):
            counts: dict[str, int] = {}
            for s in q:
                counts[s.tenant] = counts.get(s.tenant, 0) + 1
            by_state[name] = counts
        held = bm.tenant_blocks(sch.running)
        entries = list(swap.entries.values())
        with self._lock:
            hists = {n: {t: h.snapshot() for t, h in per.items()} for n, per in self._histograms.items()}
        return KernelStats(
            requests={k: sum(v.values()) for k, v in by_state.items()},
            requests_by_tenant=by_state,
            tenants={t.name: TenantStats(t.weight, t.kv_quota, t.max_waiting, t.tokens_served, t.prompt_tokens,
                                         t.output_tokens, t.vtime, held.get(t.name, 0)) for t in self.tenants.all()},
            tokens=TokenCounts(self.tokens_prefilled, self.tokens_generated),
            steps=self.num_steps,
            preemptions=dict(sw.num_preemptions),
            swap=SwapStats(swap.bytes_out, swap.bytes_in, swap.host_used, swap.disk_used, swap.host_budget,
                           swap.num_compressed, swap.bytes_saved_by_compression, sw.num_swap_ins),
            kv_blocks=KVBlockStats(bm.num_blocks, bm.num_used_blocks, bm.num_free_blocks, bm.num_cached_blocks,
                                   bm.block_size, sum(e.num_blocks for e in entries),
                                   sum(e.num_blocks for e in entries if e.compressed)),
            prefix_cache=PrefixCacheStats(bm.prefix_queries, bm.prefix_hits,
                                          bm.prefix_hits / bm.prefix_queries if bm.prefix_queries else 0.0,
                                          bm.prefix_restored, sw.prefix_store.stored if sw.prefix_store else 0),
            scheduling_policy=policy_name,
            cost_model=CostModel(sw.copy_bytes_per_s, sw.prefill_tokens_per_s),
            histograms=hists,
            process_tokens={pid: TokenCounts(*c) for pid, c in list(self.process_tokens.items())})
