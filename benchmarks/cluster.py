"""llmos as a cluster on Ray, measured through the HTTP server as clients use it.

1. Throughput: the throughput workload (64 chat requests, output 16..256 tokens, EOS
   ignored) through `llmos serve --cluster` with 2 replicas x 1 thread against `llmos
   serve` with one engine x 2 threads; both servers up at once, runs interleaved A B A B,
   medians quoted.
2. Router overhead: the router's own decision (prefix hashes + placement) per request,
   p50/p99, and the extra latency of the Ray hop: a 1-token request through the cluster
   against the single engine, one at a time.
3. Prefix affinity: 7 long system prompts x 6 turns each, through the affinity router and
   through round-robin routing (a server each); the replicas' prefix-cache hit rates.
4. Recovery: 32 streaming requests; one replica's worker is killed (SIGKILL) mid-stream.
   Time from the kill until every stream it held streams again, and until the replica
   serves again; every stream checked complete against an undisturbed run.

    python benchmarks/cluster.py [--quick] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import LocalServer, markdown_table, write_section  # noqa: E402
from benchmarks.throughput import MODEL, workload  # noqa: E402

ENGINE = {"kv_cache_memory": "512MiB", "max_num_seqs": 64}
CLUSTER = {"enabled": True, "replicas": 2, "threads_per_replica": 1, "cpus_per_replica": 1.0}


async def _run_workload(url: str, chats, lengths) -> tuple[float, int]:
    limits = httpx.Limits(max_connections=len(chats) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as http:
        async def one(chat, n):
            r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": chat, "max_tokens": n,
                                                              "ignore_eos": True, "temperature": 0})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]
        t0 = time.perf_counter()
        tokens = await asyncio.gather(*[one(c, n) for c, n in zip(chats, lengths)])
        return time.perf_counter() - t0, sum(tokens)


def throughput(single: LocalServer, cluster: LocalServer, chats, lengths, rounds: int) -> tuple[str, dict]:
    runs: dict[str, list[float]] = {"1 engine x 2 threads": [], "2 replicas x 1 thread": []}
    for _ in range(rounds):
        for name, server in (("1 engine x 2 threads", single), ("2 replicas x 1 thread", cluster)):
            seconds, tokens = asyncio.run(_run_workload(server.url, chats, lengths))
            runs[name].append(tokens / seconds)
            print(f"  {name}: {runs[name][-1]:.1f} output tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    base = med["1 engine x 2 threads"]
    rows = [[k, " / ".join(f"{x:.1f}" for x in v), f"{med[k]:.1f}", f"{med[k] / base:.3f}"] for k, v in runs.items()]
    return markdown_table(["system", "output tok/s per run", "median", "vs 1 engine"], rows), med


def router_overhead(single: LocalServer, cluster: LocalServer, n: int) -> str:
    from llmos.cluster.router import Router
    from llmos.models.loader import load_model
    tokenizer = load_model(MODEL).tokenizer
    chats, _ = workload(64)
    ids = [tokenizer.encode_chat(c)[1] for c in chats]
    router = Router(16, 64)
    for i in range(2):
        router.add_replica(i)
        router.replicas[i].alive = True
    decide = []
    for k in range(2000):
        t = time.perf_counter()
        index = router.place(router.prefix_hashes(ids[k % len(ids)]), None)
        decide.append(time.perf_counter() - t)
        router.done(index)
    hop: dict[str, list[float]] = {"1 engine x 2 threads": [], "2 replicas x 1 thread": []}
    with httpx.Client(timeout=120) as http:
        for k in range(n):
            for name, server in (("1 engine x 2 threads", single), ("2 replicas x 1 thread", cluster)):
                t = time.perf_counter()
                http.post(server.url + "/v1/chat/completions",
                          json={"model": MODEL, "messages": chats[k % len(chats)], "max_tokens": 1}).raise_for_status()
                hop[name].append(time.perf_counter() - t)
    p = {k: np.percentile(v, [50, 99]) * 1e3 for k, v in hop.items()}
    extra = p["2 replicas x 1 thread"] - p["1 engine x 2 threads"]
    d = np.percentile(decide, [50, 99]) * 1e6
    rows = [["router decision (prefix hashes + placement), in process", f"{d[0]:.0f} µs", f"{d[1]:.0f} µs"]]
    rows += [[f"1-token chat request, {k}", f"{v[0]:.1f} ms", f"{v[1]:.1f} ms"] for k, v in p.items()]
    rows.append(["cluster minus single engine (the Ray hop and the router)", f"{extra[0]:.1f} ms", f"{extra[1]:.1f} ms"])
    return markdown_table(["what", "p50", "p99"], rows)


def affinity(home: Path) -> str:
    systems = [f"You are assistant number {k}. " + "Answer briefly and politely, in plain English. " * 12
               for k in range(7)]
    rows = []
    for policy in ("affinity", "round_robin"):
        server = LocalServer(home / policy, engine={"model": MODEL, **ENGINE}, cluster={**CLUSTER, "routing": policy})
        try:
            with httpx.Client(base_url=server.url, timeout=300) as http:
                for turn in range(6):
                    for k, system in enumerate(systems):
                        http.post("/v1/chat/completions", json={
                            "model": MODEL, "max_tokens": 2,
                            "messages": [{"role": "system", "content": system},
                                         {"role": "user", "content": f"Question {turn}?"}]}).raise_for_status()
                status = http.get("/v1/cluster").json()
        finally:
            server.stop()
        hits = sum(r["stats"]["prefix_cache"]["hits"] for r in status["replicas"])
        queries = sum(r["stats"]["prefix_cache"]["queries"] for r in status["replicas"])
        rows.append([policy, queries, hits, f"{hits / queries:.3f}"])
    return markdown_table(["routing", "prompt blocks looked up", "found cached", "prefix hit rate"], rows)


async def _streams(url: str, n: int, kill_at: float | None = None):
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=n + 8)) as http:
        async def one(i):
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"Tell me a fact about {i}."}],
                    "max_tokens": 96, "ignore_eos": True, "temperature": 0, "stream": True}
            text, times = [], []
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                        if delta:
                            text.append(delta)
                            times.append(time.monotonic())
            return "".join(text), times
        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        killed = None
        if kill_at is not None:
            await asyncio.sleep(kill_at)
            pid = (await http.get("/v1/cluster")).json()["replicas"][0]["pid"]
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
        return await asyncio.gather(*tasks), killed


def recovery(cluster: LocalServer) -> str:
    before = httpx.get(cluster.url + "/v1/cluster").json()["replicas"][0]
    calm, _ = asyncio.run(_streams(cluster.url, 32))
    hit, killed = asyncio.run(_streams(cluster.url, 32, kill_at=4.0))
    same = sum(a[0] == b[0] for a, b in zip(calm, hit))
    # a stream the dead replica held: the first token after the kill came after a gap
    resumed = [next(t for t in times if t > killed) - killed for _, times in hit
               if times and times[-1] > killed and any(t < killed for t in times)]
    moved = [r for r, (_, times) in zip(resumed, hit) if r > 0.5]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        row = httpx.get(cluster.url + "/v1/cluster").json()["replicas"][0]
        if row["restarts"] > before["restarts"] and row["state"] == "up":
            break
        time.sleep(0.25)
    rows = [["streams complete and identical to an undisturbed run", f"{same} of {len(hit)}"],
            ["streams the dead replica held (a pause over 0.5 s at the kill)", len(moved)],
            ["kill -> those streams stream again, median / max",
             f"{statistics.median(moved):.2f} s / {max(moved):.2f} s" if moved else "-"],
            ["kill -> the replica serves again (Ray restart + model load)", f"{row['recovery_seconds'][-1]:.1f} s"]]
    return markdown_table(["recovery, SIGKILL of one replica's worker during 32 streams", "value"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 requests and 1 round instead of 64 and 2")
    ap.add_argument("--write", action="store_true", help="add the results to docs/benchmarks.md")
    args = ap.parse_args()
    chats, lengths = workload(16 if args.quick else 64)
    env = {"RAY_AUTH_MODE": "token"}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        single = LocalServer(home / "single", engine={"model": MODEL, **ENGINE})
        cluster = LocalServer(home / "cluster", engine={"model": MODEL, **ENGINE}, cluster=CLUSTER, env=env)
        try:
            tput, med = throughput(single, cluster, chats, lengths, 1 if args.quick else 2)
            print(tput, flush=True)
            overhead = router_overhead(single, cluster, 10 if args.quick else 40)
            print(overhead, flush=True)
            single.stop()
            rec = recovery(cluster)
            print(rec, flush=True)
        finally:
            single.stop()
            cluster.stop()
        aff = affinity(home)
        print(aff, flush=True)
    note = (f"{len(chats)} chat requests at once, output {min(lengths)}..{max(lengths)} tokens, engine {ENGINE}; "
            f"cluster {CLUSTER}: a local Ray cluster on this 2-core machine, started by the server. Both servers "
            f"ran at the same time (idle while the other was measured).")
    body = (f"### Throughput: 2 replicas x 1 thread vs 1 engine x 2 threads\n\n{tput}\n\n{note}\n\n"
            f"### Router overhead\n\n{overhead}\n\n### Prefix affinity vs round robin (7 system prompts x 6 "
            f"turns)\n\n{aff}\n\n### Recovery\n\n{rec}\n")
    if args.write:
        write_section("Cluster", ".venv/bin/python benchmarks/cluster.py" + (" --quick" if args.quick else "")
                      + " --write", body)


if __name__ == "__main__":
    main()
