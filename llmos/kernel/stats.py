"""Counters and histograms the kernel keeps, per tenant where that makes sense. Plain data:
the server exports them to Prometheus; `LLM.stats()` hands them out as a dict."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

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

    def as_dict(self) -> dict:
        cumulative, acc = {}, 0
        for b, c in zip(list(self.buckets) + [float("inf")], self.counts):
            acc += c
            cumulative[b] = acc
        return {"count": self.count, "sum": self.sum, "buckets": cumulative,
                "mean": self.sum / self.count if self.count else None}


class KernelStats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.histograms: dict[str, dict[str, Histogram]] = defaultdict(lambda: defaultdict(Histogram))

    def observe(self, name: str, tenant: str, value: float) -> None:
        with self.lock:
            self.histograms[name][tenant].observe(value)

    def snapshot(self) -> dict[str, dict[str, dict]]:
        with self.lock:
            return {name: {t: h.as_dict() for t, h in per.items()} for name, per in self.histograms.items()}
