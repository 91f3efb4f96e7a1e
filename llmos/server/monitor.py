"""The resource monitor behind the dashboard and `llmos top`: it samples the kernel once a
second, for every watcher at once, so ten open dashboards cost the engine what one does.

A sample is plain JSON: rates (tokens/s), request counts by state, KV pool and swap use,
prefix-cache hit rate, latency percentiles over the last minute, the server's CPU and RSS,
per-tenant shares, and -- while someone watches -- the live request rows and the memory map.
The last minutes of light samples are kept, so a dashboard opened now draws its charts at
once. `view()` cuts a sample down to what a key may see: a tenant sees machine-wide totals
but only its own rows, tenants and latency, and other tenants' blocks without names."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque

import anyio
import psutil

from llmos.api.llm import LLM
from llmos.kernel.stats import KernelStats

log = logging.getLogger("llmos.server")

LATENCIES = {"ttft": "time_to_first_token_seconds", "itl": "inter_token_latency_seconds"}
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}


def percentile(buckets: dict[float, int], q: float) -> float | None:
    """The q-quantile of a histogram given as upper bound -> count in that bucket,
    interpolated linearly inside the bucket (as Prometheus' histogram_quantile does)."""
    total = sum(buckets.values())
    if total <= 0:
        return None
    rank, seen, lower = q * total, 0, 0.0
    for upper, count in sorted(buckets.items()):
        if count and seen + count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
        lower = upper if upper != float("inf") else lower
    return lower


class Monitor:
    def __init__(self, llm: LLM, interval: float = 1.0, keep_seconds: float = 600.0, window: float = 60.0) -> None:
        self.llm = llm
        self.interval = interval
        self.window = window
        self.history: deque[dict] = deque(maxlen=max(1, int(keep_seconds / interval)))
        self.latest: dict | None = None
        self.watchers = 0                # open feeds; the heavy parts are sampled only for them
        self._hists: deque[tuple[float, dict]] = deque()    # (t, name -> tenant -> per-bucket counts)
        self._last: tuple[float, KernelStats] | None = None
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)
        self._changed: asyncio.Condition | None = None
        self.version = 0
        self._encoded: dict[tuple[int, str | None], str] = {}

    # -- sampling ------------------------------------------------------------------------
    async def run(self) -> None:
        """Sample every `interval` until cancelled (the server's lifespan owns this task)."""
        self._changed = asyncio.Condition()
        while True:
            started = time.monotonic()
            try:
                sample = await anyio.to_thread.run_sync(self.sample, self.watchers > 0)
            except Exception:     # a bad sample must not end monitoring; the next one may do
                log.exception("monitor: sampling failed")
            else:
                await self._publish(sample)
            await asyncio.sleep(max(0.05, self.interval - (time.monotonic() - started)))

    async def _publish(self, sample: dict) -> None:
        self.latest = sample
        self.history.append({k: v for k, v in sample.items() if k not in ("rows", "memory_map")})
        async with self._changed:
            self.version += 1
            self._changed.notify_all()

    async def next_sample(self, version: int, timeout: float) -> tuple[int, dict | None]:
        """Wait for a sample newer than `version` (None after `timeout` seconds)."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.version > version), timeout)
            except asyncio.TimeoutError:
                return version, None
            return self.version, self.latest

    def sample(self, detailed: bool = True) -> dict:
        """One sample now (blocking: reads the kernel under the engine lock)."""
        now = time.time()
        stats = self.llm.stats()
        rows = self.llm.list_requests() if detailed else None
        memory = self.llm.memory_map() if detailed else None
        dt = now - self._last[0] if self._last else 0.0
        prev = self._last[1] if self._last else None
        self._last = (now, stats)

        def rate(new: int, old: int | None) -> float:
            return round((new - old) / dt, 2) if prev is not None and dt > 0 and old is not None else 0.0

        latency = self._latency(now, stats)
        kv, swap = stats.kv_blocks, stats.swap
        tenants = {}
        for name, t in stats.tenants.items():
            old = prev.tenants.get(name) if prev else None
            tenants[name] = {"weight": t.weight, "kv_quota": t.kv_quota, "kv_blocks": t.kv_blocks,
                             "tokens_served": t.tokens_served,
                             "tokens_per_s": rate(t.tokens_served, old.tokens_served if old else 0),
                             "latency": latency.get(name, {})}
        sample = {
            "t": round(now, 3),
            "tokens_per_s": {"prompt": rate(stats.tokens.prompt, prev.tokens.prompt if prev else None),
                             "output": rate(stats.tokens.generated, prev.tokens.generated if prev else None)},
            "requests": {k: stats.requests.get(k, 0) for k in ("running", "waiting", "swapped", "suspended")},
            "kv": {"total": kv.total, "used": kv.used, "free": kv.free, "cached": kv.cached,
                   "block_size": kv.block_size, "block_bytes": self.llm.kv_block_bytes},
            "swap": {"host_bytes": swap.host_bytes, "host_budget": swap.host_budget, "disk_bytes": swap.disk_bytes,
                     "swapped_blocks": kv.swapped, "swapped_requests": stats.requests.get("swapped", 0)},
            "prefix_cache": {"hit_rate": round(stats.prefix_cache.hit_rate, 4), "queries": stats.prefix_cache.queries,
                             "hits": stats.prefix_cache.hits},
            "latency": latency.get(None, {}),
            "server": {"cpu_percent": self._proc.cpu_percent(None), "rss_bytes": self._proc.memory_info().rss},
            "tenants": tenants,
            "scheduling_policy": stats.scheduling_policy,
        }
        if detailed:
            sample["rows"] = [dataclasses.asdict(r) for r in rows]
            sample["memory_map"] = _map_dict(memory.to_dict())
        return sample

    def _latency(self, now: float, stats: KernelStats) -> dict:
        """TTFT and inter-token percentiles over the last `window` seconds, machine-wide
        (key None) and per tenant, from the difference of two cumulative histograms."""
        current = {name: {tenant: _counts(h.buckets) for tenant, h in stats.histograms.get(hist, {}).items()}
                   for name, hist in LATENCIES.items()}
        self._hists.append((now, current))
        while len(self._hists) > 1 and self._hists[1][0] <= now - self.window:
            self._hists.popleft()
        base = self._hists[0][1] if len(self._hists) > 1 else {}
        out: dict = {}
        for name in LATENCIES:
            total: dict[float, int] = {}
            for tenant, counts in current[name].items():
                old = base.get(name, {}).get(tenant, {})
                delta = {b: c - old.get(b, 0) for b, c in counts.items()}
                for b, c in delta.items():
                    total[b] = total.get(b, 0) + c
                out.setdefault(tenant, {})[name] = _quantiles(delta)
            out.setdefault(None, {})[name] = _quantiles(total)
        return out

    def encoded(self, version: int, scope: str | None, encode) -> str:
        """Sample `version` as the feed sends it to `scope` (a tenant; None for admins),
        encoded once however many dashboards of that scope watch."""
        key = (version, scope)
        if key not in self._encoded:
            if len(self._encoded) > 64:
                self._encoded.clear()
            self._encoded[key] = encode()
        return self._encoded[key]

    # -- what a key may see ---------------------------------------------------------------
    @staticmethod
    def view(sample: dict, tenant: str, admin: bool) -> dict:
        if admin:
            return sample
        out = dict(sample)
        mine = sample["tenants"].get(tenant)
        out["tenants"] = {tenant: mine} if mine else {}
        out["latency"] = mine["latency"] if mine else {name: _quantiles({}) for name in LATENCIES}
        if "rows" in sample:
            out["rows"] = [r for r in sample["rows"] if r["tenant"] == tenant]
        if "memory_map" in sample:
            m = dict(sample["memory_map"])
            m["owners"] = [o if o["tenant"] == tenant else {"request_id": None, "tenant": None} for o in m["owners"]]
            m["swap"] = dict(m["swap"], entries=[e for e in m["swap"]["entries"] if e["tenant"] == tenant])
            out["memory_map"] = m
        return out


def _counts(cumulative: dict[float, int]) -> dict[float, int]:
    """Cumulative bucket counts -> the count in each bucket."""
    out, prev = {}, 0
    for b in sorted(cumulative):
        out[b] = cumulative[b] - prev
        prev = cumulative[b]
    return out


def _quantiles(buckets: dict[float, int]) -> dict:
    return {k: (None if (v := percentile(buckets, q)) is None else round(v, 4)) for k, q in QUANTILES.items()}


def _map_dict(m: dict) -> dict:
    """The memory map in the feed's shape: the swap tier grouped under "swap"."""
    return {"total": m["total"], "block_size": m["block_size"], "blocks": m["blocks"], "owners": m["owners"],
            "shared": m["shared"],
            "swap": {"host_budget": m["swap_host_budget"], "host_bytes": m["swap_host_bytes"],
                     "disk_bytes": m["swap_disk_bytes"], "block_bytes": m["block_bytes"],
                     "entries": m["swap"], "prefix_blocks": m["prefix_blocks"]}}
