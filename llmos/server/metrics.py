"""Prometheus metrics, named llmos_*, read from `LLM.stats()` at scrape time so they are
never out of step with the kernel."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from llmos.server.state import ServerState

_HISTOGRAMS = {
    "queue_time_seconds": "Seconds from arrival to first being scheduled",
    "time_to_first_token_seconds": "Seconds from arrival to the first generated token",
    "inter_token_latency_seconds": "Seconds between consecutive generated tokens of one request",
}


class KernelCollector:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s = self.state.llm.stats()
        g = GaugeMetricFamily("llmos_requests", "Requests in the kernel by state", labels=["state"])
        for state, n in s.requests.items():
            g.add_metric([state], n)
        yield g
        g = GaugeMetricFamily("llmos_tenant_requests", "Requests in the kernel by tenant and state",
                              labels=["tenant", "state"])
        for state, per in s.requests_by_tenant.items():
            for tenant, n in per.items():
                g.add_metric([tenant, state], n)
        yield g
        c = CounterMetricFamily("llmos_tokens", "Tokens processed", labels=["kind"])
        c.add_metric(["prompt"], s.tokens.prompt)
        c.add_metric(["generated"], s.tokens.generated)
        yield c
        c = CounterMetricFamily("llmos_tenant_tokens", "Tokens processed per tenant", labels=["tenant", "kind"])
        w = GaugeMetricFamily("llmos_tenant_weight", "Each tenant's fair-share weight", labels=["tenant"])
        kv = GaugeMetricFamily("llmos_tenant_kv_blocks", "KV blocks held by each tenant's running requests",
                               labels=["tenant"])
        for tenant, t in s.tenants.items():
            c.add_metric([tenant, "prompt"], t.prompt_tokens)
            c.add_metric([tenant, "generated"], t.output_tokens)
            w.add_metric([tenant], t.weight)
            kv.add_metric([tenant], t.kv_blocks)
        yield from (c, w, kv)
        yield CounterMetricFamily("llmos_engine_steps", "Engine iterations run", value=s.steps)
        if s.compute:
            c = CounterMetricFamily("llmos_compute_steps", "Forward passes by weight path (stack: the C++ "
                                    "decode stack; packed: packed kernels op by op; float32: GEMMs on "
                                    "dequantized tiles)", labels=["path"])
            for path, n in s.compute.get("steps", {}).items():
                c.add_metric([path], n)
            yield c
            yield GaugeMetricFamily("llmos_weight_bytes", "Bytes the model's weight matrices take in memory",
                                    value=s.compute.get("weight_bytes", 0))
            yield GaugeMetricFamily("llmos_panel_bytes", "Bytes of the VNNI panels kept beside the weight "
                                    "matrices for int8 activations (0: none)", value=s.compute.get("panel_bytes", 0))
        c = CounterMetricFamily("llmos_preemptions", "Running requests preempted, by mode", labels=["mode"])
        for mode, n in s.preemptions.items():
            c.add_metric([mode], n)
        yield c
        c = CounterMetricFamily("llmos_swap_bytes", "KV bytes moved to and from the swap tier", labels=["direction"])
        c.add_metric(["out"], s.swap.bytes_out)
        c.add_metric(["in"], s.swap.bytes_in)
        yield c
        g = GaugeMetricFamily("llmos_kv_blocks", "KV cache blocks by state", labels=["state"])
        for state in ("total", "used", "free", "cached"):
            g.add_metric([state], getattr(s.kv_blocks, state))
        yield g
        yield CounterMetricFamily("llmos_prefix_cache_queries", "Prefix cache lookups",
                                  value=s.prefix_cache.queries)
        yield CounterMetricFamily("llmos_prefix_cache_hits", "Prefix cache hits", value=s.prefix_cache.hits)
        yield GaugeMetricFamily("llmos_prefix_cache_hit_rate", "Prefix cache hits per lookup",
                                value=s.prefix_cache.hit_rate)
        for name, help_text in _HISTOGRAMS.items():
            h = HistogramMetricFamily(f"llmos_{name}", help_text, labels=["tenant"])
            for tenant, hist in s.histograms.get(name, {}).items():
                buckets = [(_bound(b), n) for b, n in hist.buckets.items()]
                h.add_metric([tenant], buckets, sum_value=hist.sum)
            yield h
        yield GaugeMetricFamily("llmos_http_requests_in_flight", "Generation and embedding requests being served",
                                value=self.state.drain.in_flight)
        if self.state.agents is not None:
            yield from self._agents()
        if hasattr(self.state.llm, "replicas"):
            yield from self._cluster()

    def _cluster(self) -> Iterator[Metric]:
        """Each engine replica of a cluster, by index (the totals above add them all up)."""
        rows = self.state.llm.replicas()
        up = GaugeMetricFamily("llmos_replica_up", "1 while the replica serves, 0 while it is down or draining",
                               labels=["replica"])
        inflight = GaugeMetricFamily("llmos_replica_requests", "Requests the router has running on each replica",
                                     labels=["replica"])
        kv = GaugeMetricFamily("llmos_replica_kv_blocks_used", "KV blocks in use on each replica", labels=["replica"])
        restarts = CounterMetricFamily("llmos_replica_restarts", "Times each replica died and came back",
                                       labels=["replica"])
        for r in rows:
            label = [str(r["index"])]
            up.add_metric(label, 1 if r["state"] == "up" else 0)
            inflight.add_metric(label, r["inflight"])
            kv.add_metric(label, r["kv_used"])
            restarts.add_metric(label, r["restarts"])
        yield from (up, inflight, kv, restarts)
        routing = self.state.llm.routing_stats()
        yield CounterMetricFamily("llmos_router_requests", "Requests the cluster router placed", value=routing["routed"])
        yield CounterMetricFamily("llmos_router_affinity_requests",
                                  "Requests placed on a replica that held their leading prompt blocks",
                                  value=routing["affinity_routed"])
        yield GaugeMetricFamily("llmos_router_queued", "Requests waiting at the router for a replica",
                                value=routing["queued"])

    def _agents(self) -> Iterator[Metric]:
        agents, guard = self.state.agents, self.state.guard
        g = GaugeMetricFamily("llmos_processes", "Agent processes by state", labels=["state"])
        counts: dict[str, int] = {}
        for p in agents.table.list(include_exited=True):
            counts[p.state.value] = counts.get(p.state.value, 0) + 1
        for state, n in counts.items():
            g.add_metric([state], n)
        yield g
        c = CounterMetricFamily("llmos_syscalls", "System calls by family and outcome (ok, error, denied, replayed)",
                                labels=["family", "outcome"])
        for (family, outcome), n in sorted(agents.syscalls.counts.items()):
            c.add_metric([family, outcome], n)
        yield c
        yield CounterMetricFamily("llmos_syscall_denials", "System calls refused for a missing capability",
                                  value=agents.intrusion.denials)
        q = agents.ipc.stats()
        c = CounterMetricFamily("llmos_messages", "Messages by event", labels=["event"])
        for event in ("sent", "delivered", "redelivered", "acked", "dead_lettered"):
            c.add_metric([event], q.get(event, 0))
        yield c
        g = GaugeMetricFamily("llmos_mailbox_depth", "Unacknowledged messages per tenant", labels=["tenant"])
        per: dict[str, int] = {}
        for (tenant, _), n in agents.ipc.depths().items():
            per[tenant] = per.get(tenant, 0) + n
        for tenant, n in per.items():
            g.add_metric([tenant], n)
        yield g
        yield GaugeMetricFamily("llmos_messages_in_flight", "Messages received but not yet acknowledged",
                                value=q.get("in_flight", 0))
        yield CounterMetricFamily("llmos_processes_flagged", "Agents suspended for too many denied calls",
                                  value=agents.intrusion.processes_flagged)
        yield CounterMetricFamily("llmos_addresses_blocked", "Client addresses blocked after too many bad API keys "
                                  "(their further bad keys get 429; valid keys are served)",
                                  value=guard.addresses_blocked)
        if agents.library is not None:
            yield from self._library(agents.library)

    def _library(self, library) -> Iterator[Metric]:
        pool = library.pool.stats()
        c = CounterMetricFamily("llmos_tool_calls", "Tool calls run in the worker pool, by outcome "
                                "(ok, error, timeout, refused)", labels=["outcome"])
        for outcome in ("ok", "error", "timeout", "refused"):
            c.add_metric([outcome], pool["calls"].get(outcome, 0))
        yield c
        yield CounterMetricFamily("llmos_tool_seconds", "Seconds callers spent in tool calls", value=pool["seconds"])
        yield GaugeMetricFamily("llmos_tool_workers_stuck", "Workers written off inside a hung tool",
                                value=pool["stuck"])
        yield GaugeMetricFamily("llmos_tool_calls_running", "Tool calls running now", value=pool["running"])
        yield GaugeMetricFamily("llmos_approvals_pending", "Tool calls waiting for a person's decision",
                                value=len(library.approvals.list(state="pending")))


def _bound(b: float) -> str:
    return "+Inf" if b == float("inf") else repr(float(b))


def render(state: ServerState) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KernelCollector(state))
    return generate_latest(registry)
