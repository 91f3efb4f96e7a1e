"""llmos as a cluster on Ray: `llmos serve --cluster` with a local Ray cluster of 2 engine
replicas (1 thread each) on the real model, driven over HTTP. Outputs match one engine's;
requests sharing a long system prompt land where it is cached; a replica killed (its actor,
or its worker process with SIGKILL) during 32 streams loses nothing and comes back; tenant
weights hold across replicas."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import pytest
import torch

from test_server import MODEL, ServerProcess
from llmos.cluster.router import Router

MAX_TOKENS = 32
# A driver that connects by address uses the local cluster's token (~/.ray/auth_token) only
# when told to, and Ray reads this when it is imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")


# -- the router alone ------------------------------------------------------------------------
def test_router_prefers_the_replica_holding_the_prefix_until_load_says_otherwise():
    r = Router(block_size=4, max_inflight=8, affinity_slack=2)
    for i in (0, 1):
        r.add_replica(i)
        r.replicas[i].alive = True
    system = list(range(40))
    first = r.place(r.prefix_hashes(system + [1, 2, 3, 4]), None)
    assert r.place(r.prefix_hashes(system + [5, 6, 7, 8]), None) == first     # the cache wins at equal load
    assert r.affinity_routed == 1
    r.replicas[first].inflight = 6                                            # ... but not against a queue
    assert r.place(r.prefix_hashes(system + [9, 9, 9, 9]), None) != first
    # an adapter salts the hashes: no affinity between the same prompt under two adapters
    assert r.prefix_hashes(system, "a")[0] != r.prefix_hashes(system, None)[0]


def test_router_fair_queue_follows_global_virtual_time():
    r = Router(block_size=4, max_inflight=1)
    r.set_weight("a", 2.0)
    r.set_weight("b", 1.0)
    for i in range(6):
        r.enqueue(("a", i), "a", 0)
        r.enqueue(("b", i), "b", 0)
    order = []
    for _ in range(9):
        item = r.pop()
        order.append(item[0])
        r.charge(item[0], 10)
    assert order.count("a") == 6 and order.count("b") == 3          # 2:1 while both wait
    r.enqueue("moved", "b", 0, urgent=True)
    assert r.pop() == "moved"                                       # a request moved off a dead replica goes first


# -- a real cluster behind a real server -----------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory, default_model_path):
    s = ServerProcess(tmp_path_factory.mktemp("cluster"), engine={"kv_cache_memory": "128MiB"},
                      extra={"cluster": {"enabled": True, "replicas": 2, "threads_per_replica": 1,
                                         "max_inflight_per_replica": 4}})
    s.heavy = s.create_key("heavy", weight=2.0)
    s.light = s.create_key("light", weight=1.0)
    yield s
    assert s.stop() == 0, s.log.read_text()[-3000:]


def _status(server) -> dict:
    with server.http() as h:
        return h.get("/v1/cluster").json()


def _chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Tell me one fact about the number {i}."}]


async def _streams(server, n: int, on_started=None) -> list[list[str]]:
    """n greedy streaming chats at once; each stream's tokens in arrival order."""
    async def one(http, i):
        body = {"model": MODEL, "messages": _chat(i), "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0,
                "stream": True, "logprobs": True}
        tokens = []
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    lp = event["choices"][0].get("logprobs") if event["choices"] else None
                    tokens += [c["token"] for c in (lp or {}).get("content") or []]
        return tokens

    headers = {"Authorization": f"Bearer {server.admin_key}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=600,
                                 limits=httpx.Limits(max_connections=n + 8)) as http:
        tasks = [asyncio.create_task(one(http, i)) for i in range(n)]
        if on_started:
            await on_started(http)
        return await asyncio.gather(*tasks)


@pytest.fixture(scope="module")
def undisturbed(cluster):
    return asyncio.run(_streams(cluster, 32))


def test_outputs_match_one_engine(cluster, undisturbed):
    from llmos import LLM, SamplingParams
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                     # as each replica runs
    try:
        with LLM(MODEL, kv_cache_memory="64MiB") as llm:
            outs = llm.chat([_chat(i) for i in range(32)],
                            SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0, logprobs=0))
    finally:
        torch.set_num_threads(threads)
    assert [[lp.token for lp in o.logprobs] for o in outs] == undisturbed
    assert all(len(t) == MAX_TOKENS for t in undisturbed)
    status = _status(cluster)
    served = [r["stats"]["tokens"]["generated"] for r in status["replicas"]]
    assert all(n > 0 for n in served), f"one replica did all the work: {served}"


async def _wait_back(http, index: int, restarts: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = (await http.get("/v1/cluster")).json()["replicas"][index]
        if r["state"] == "up" and r["restarts"] > restarts:
            return r
        await asyncio.sleep(0.25)
    raise AssertionError(f"replica {index} did not come back within {timeout} s")


async def _when_streaming(http, index: int) -> dict:
    """Wait until replica `index` is streaming tokens of some requests; its status row."""
    while True:
        st = (await http.get("/v1/cluster")).json()
        rows = (await http.get("/v1/kernel/requests")).json()["data"]
        if any(r["replica"] == index and r["output_tokens"] >= 4 for r in rows):
            return st["replicas"][index]
        await asyncio.sleep(0.05)


def test_sigkill_of_a_replica_worker_loses_no_stream(cluster, undisturbed):
    back = {}

    async def kill(http):
        row = await _when_streaming(http, 0)
        os.kill(row["pid"], signal.SIGKILL)
        back.update(await _wait_back(http, 0, row["restarts"]))

    disturbed = asyncio.run(_streams(cluster, 32, kill))
    assert disturbed == undisturbed          # every stream complete, no gap, no repeat
    assert back["pid"] and back["recovery_seconds"]


def test_killing_a_replica_actor_loses_no_stream(cluster, undisturbed):
    import ray
    status = _status(cluster)
    ray.init(address=status["routing"]["ray_address"], namespace="llmos", log_to_driver=False,
             configure_logging=False)
    try:
        actor = ray.get_actor(f"llmos-replica-1-{cluster.proc.pid}")
        back = {}

        async def kill(http):
            row = await _when_streaming(http, 1)
            ray.kill(actor, no_restart=False)
            back.update(await _wait_back(http, 1, row["restarts"]))

        disturbed = asyncio.run(_streams(cluster, 32, kill))
    finally:
        ray.shutdown()
    assert disturbed == undisturbed
    assert back["state"] == "up"


def test_a_shared_system_prompt_lands_where_it_is_cached(cluster):
    systems = [f"You are assistant number {k}. " + "Answer briefly and politely, in plain English. " * 12
               for k in range(4)]
    def prefix(status):
        stats = [r["stats"]["prefix_cache"] for r in status["replicas"]]
        return sum(p["hits"] for p in stats), sum(p["queries"] for p in stats)

    start = _status(cluster)
    before = start["routing"]
    with cluster.http() as h:
        for turn in range(4):
            for k, system in enumerate(systems):
                r = h.post("/v1/chat/completions", json={
                    "model": MODEL, "max_tokens": 2, "messages": [{"role": "system", "content": system},
                                                                  {"role": "user", "content": f"Question {turn}?"}]})
                assert r.status_code == 200
    end = _status(cluster)
    after = end["routing"]
    placed = after["routed"] - before["routed"]
    by_affinity = after["affinity_routed"] - before["affinity_routed"]
    assert placed == 16 and by_affinity >= 12          # every turn after each prompt's first
    # Round robin would compute each system prompt once on each replica: at most half of the
    # system prompts' blocks would hit. Here all but each prompt's first computation do.
    hits, queries = (a - b for a, b in zip(prefix(end), prefix(start)))
    assert hits / queries > 0.6, (hits, queries)


def test_tenant_weights_hold_across_replicas(cluster):
    """heavy (weight 2) and light (weight 1) each send 60 requests at once, more than the
    replicas take. Once the router's clocks for the two have met (the first requests ran in
    arrival order while slots were free) and the requests already running then have drained,
    and while both still have requests waiting, heavy is served twice light's tokens, counted
    over the whole cluster: the slope of heavy's tokens against light's over that window."""
    samples = []

    def run(key: str):
        with httpx.Client(base_url=cluster.url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as c:
            def one(i):
                r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": _chat(i), "max_tokens": 16,
                                                         "ignore_eos": True})
                assert r.status_code == 200
            threads = [threading.Thread(target=one, args=(i,)) for i in range(60)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    def sample() -> tuple[dict, dict, dict]:
        with cluster.http() as h:
            tenants = h.get("/v1/kernel/stats").json()["tenants"]
            routing = h.get("/v1/cluster").json()["routing"]
        tokens = {t: tenants.get(t, {}).get("output_tokens", 0) for t in ("heavy", "light")}
        return tokens, routing["queued_by_tenant"], routing["virtual_time"]

    workers = [threading.Thread(target=run, args=(k,)) for k in (cluster.heavy, cluster.light)]
    for w in workers:
        w.start()
    while any(w.is_alive() for w in workers):
        samples.append(sample())
        time.sleep(0.1)
    for w in workers:
        w.join()
    both = [(tokens, clock) for tokens, queued, clock in samples if queued.get("heavy") and queued.get("light")]
    met = next(i for i, (_, clock) in enumerate(both) if abs(clock["heavy"] - clock["light"]) < 60)
    # Requests dispatched before the clocks met (at most replicas x max_inflight_per_replica,
    # mostly light's: they arrived first) still finish afterwards: their tokens are not the
    # router's 2:1 choice. The window starts once that many light tokens have come out.
    drain = 2 * 4 * 16
    window = [tokens for tokens, _ in both[met:] if tokens["light"] >= both[met][0]["light"] + drain]
    assert len(window) >= 8, f"too short a window of contention: {samples}"
    h, l = [w["heavy"] for w in window], [w["light"] for w in window]
    mh, ml = sum(h) / len(h), sum(l) / len(l)
    slope = sum((y - mh) * (x - ml) for x, y in zip(l, h)) / sum((x - ml) ** 2 for x in l)
    assert 1.8 <= slope <= 2.2, (slope, window)
