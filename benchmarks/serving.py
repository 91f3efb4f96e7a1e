"""Serving overhead: the same chat workload through the HTTP server (streaming clients) and
through the in-process Python API, one after the other in one run.

64 chat requests (benchmarks/throughput.py's workload: output lengths 16..256 from a fixed
seed, EOS ignored), all sent at once. The HTTP run starts `llmos serve` (auth off, on
loopback) in a subprocess and streams every request with its own connection; the Python
run submits the same requests to an `LLM` in this process and reads each handle's stream
on its own thread, as the server does. Reported per system: output tokens/s (first
request sent to last token received), p50/p99 time to first token and inter-token
latency as the client sees them, and the HTTP/Python throughput ratio.

With `--dashboards N`: the cost of the live dashboard feed instead. One server; the same
HTTP workload runs with N dashboards open (each an SSE client of /v1/dashboard/feed that
parses every sample, as the browser page does) and with none, interleaved A B A B for
`--rounds` rounds; medians of output tokens/s and their ratio.

    python benchmarks/serving.py [--quick] [--write]
    python benchmarks/serving.py --dashboards 5 [--rounds 3] [--quick] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # see benchmarks/throughput.py

import httpx  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import LocalServer, cpu_seconds, markdown_table, write_section  # noqa: E402
from benchmarks.throughput import MODEL, WARMUP, workload  # noqa: E402

ENGINE = {"kv_cache_memory": "1GiB", "max_num_seqs": 64}


class Trace:
    """When one request was sent and when each of its tokens arrived."""

    def __init__(self) -> None:
        self.sent = 0.0
        self.arrivals: list[float] = []   # one entry per token
        self.tokens = 0


def process_cpu(pid: int) -> float:
    """CPU-seconds a process has used (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Others:
    """Cores kept busy by processes other than the ones measured, over a timed part."""

    def __init__(self) -> None:
        self.busy, self.own = cpu_seconds()
        self.t = time.perf_counter()

    def cores(self, measured_pid_cpu: float = 0.0) -> float:
        busy, own = cpu_seconds()
        return max(0.0, busy - self.busy - (own - self.own) - measured_pid_cpu) / (time.perf_counter() - self.t)


def run_python(chats, lengths) -> tuple[list[Trace], float, float]:
    from llmos import LLM, SamplingParams
    llm = LLM(MODEL, **ENGINE)
    llm.chat(WARMUP, SamplingParams(max_tokens=4))
    traces = [Trace() for _ in chats]

    def read(handle, trace: Trace) -> None:
        for delta in handle:
            now = time.perf_counter()
            trace.arrivals.extend([now] * len(delta.token_ids))
        trace.tokens = len(handle.result().token_ids)

    others = Others()
    t0 = time.perf_counter()
    threads = []
    for chat, n, trace in zip(chats, lengths, traces):
        # All are sent at t0: a submit can wait out an engine step, and that wait is part of
        # the request's time to first token, as it is for an HTTP client.
        trace.sent = t0
        handle = llm.submit(chat, SamplingParams(max_tokens=n, ignore_eos=True, temperature=0))
        threads.append(threading.Thread(target=read, args=(handle, trace)))
        threads[-1].start()
    for t in threads:
        t.join()
    elapsed = max(t.arrivals[-1] for t in traces) - t0
    busy = others.cores()
    llm.close()
    return traces, elapsed, busy


def run_http(chats, lengths) -> tuple[list[Trace], float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        server = LocalServer(Path(tmp), engine={"model": MODEL, **ENGINE})
        try:
            server_cpu = process_cpu(server.proc.pid)
            others = Others()
            traces, elapsed = asyncio.run(_http_clients(server.url, chats, lengths))
            return traces, elapsed, others.cores(process_cpu(server.proc.pid) - server_cpu)
        finally:
            server.stop()


async def _http_clients(url: str, chats, lengths) -> tuple[list[Trace], float]:
    limits = httpx.Limits(max_connections=len(chats) + 8, max_keepalive_connections=len(chats) + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as http:
        await http.post("/v1/chat/completions", json={"model": MODEL, "messages": WARMUP, "max_tokens": 4})
        traces = [Trace() for _ in chats]

        async def client(chat, n, trace: Trace) -> None:
            body = {"model": MODEL, "messages": chat, "max_tokens": n, "ignore_eos": True, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            trace.sent = time.perf_counter()
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    now = time.perf_counter()
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        trace.tokens = event["usage"]["completion_tokens"]
                    elif event["choices"] and event["choices"][0]["delta"].get("content"):
                        trace.arrivals.append(now)

        t0 = time.perf_counter()
        await asyncio.gather(*[client(c, n, t) for c, n, t in zip(chats, lengths, traces)])
        return traces, max(t.arrivals[-1] for t in traces) - t0


async def _dashboard(url: str, seen: list[int]) -> None:
    """One open dashboard: reads the live feed and parses every event, until cancelled."""
    async with httpx.AsyncClient(base_url=url, timeout=None) as http:
        async with http.stream("GET", "/v1/dashboard/feed") as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    json.loads(line[6:])
                    seen[0] += 1


async def _with_dashboards(url: str, chats, lengths, n: int) -> tuple[list[Trace], float, int]:
    seen = [0]
    watchers = [asyncio.create_task(_dashboard(url, seen)) for _ in range(n)]
    while seen[0] < n:                           # every dashboard connected and drawing
        await asyncio.sleep(0.05)
    traces, elapsed = await _http_clients(url, chats, lengths)
    for w in watchers:
        w.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    return traces, elapsed, seen[0]


def run_dashboards(chats, lengths, n: int, rounds: int) -> tuple[str, str]:
    """Throughput with n dashboards open vs none, on one server, interleaved."""
    runs: dict[int, list[float]] = {0: [], n: []}
    samples = 0
    with tempfile.TemporaryDirectory() as tmp:
        server = LocalServer(Path(tmp), engine={"model": MODEL, **ENGINE})
        try:
            for _ in range(rounds):
                for count in (0, n):
                    traces, elapsed, seen = asyncio.run(_with_dashboards(server.url, chats, lengths, count))
                    runs[count].append(sum(t.tokens for t in traces) / elapsed)
                    samples += seen
                    print(f"  {count} dashboards: {runs[count][-1]:.1f} output tok/s", flush=True)
        finally:
            server.stop()
    med = {k: float(np.median(v)) for k, v in runs.items()}
    rows = [[f"{k} dashboards open", " / ".join(f"{x:.1f}" for x in v), f"{med[k]:.1f}", f"{med[k] / med[0]:.3f}"]
            for k, v in runs.items()]
    table = markdown_table(["system", "output tok/s per run", "median", "vs none"], rows)
    note = (f"{len(chats)} streaming chat requests sent at once, output {min(lengths)}..{max(lengths)} tokens (EOS "
            f"ignored, greedy), engine {ENGINE}, one server, runs interleaved (none, {n}, none, {n}, ...). Each "
            f"dashboard is an SSE client of /v1/dashboard/feed parsing every sample (rows and memory map "
            f"included); {samples} samples were read in all. The monitor samples the kernel once a second "
            f"whether one dashboard or many watch.")
    return table, note


def summarize(traces: list[Trace], elapsed: float, others: float) -> dict:
    ttft = [t.arrivals[0] - t.sent for t in traces]
    itl = [b - a for t in traces for a, b in zip(t.arrivals, t.arrivals[1:])]
    tokens = sum(t.tokens for t in traces)
    return {"seconds": elapsed, "tokens": tokens, "tok_s": tokens / elapsed, "others": others,
            "ttft": np.percentile(ttft, [50, 99]), "itl": np.percentile(itl, [50, 99])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 requests instead of 64")
    ap.add_argument("--write", action="store_true", help="add the results to docs/benchmarks.md")
    ap.add_argument("--dashboards", type=int, default=0, help="measure N open dashboards against none")
    ap.add_argument("--rounds", type=int, default=3, help="with --dashboards: A B rounds")
    args = ap.parse_args()
    chats, lengths = workload(16 if args.quick else 64)
    if args.dashboards:
        table, note = run_dashboards(chats, lengths, args.dashboards, args.rounds)
        print(table + "\n\n" + note)
        if args.write:
            command = (f".venv/bin/python benchmarks/serving.py --dashboards {args.dashboards} --rounds {args.rounds}"
                       + (" --quick" if args.quick else "") + " --write")
            write_section("Serving: live dashboards", command, f"### Throughput with dashboards open\n\n{table}"
                          f"\n\n{note}")
        return
    results = {"python API": summarize(*run_python(chats, lengths)), "HTTP": summarize(*run_http(chats, lengths))}
    base = results["python API"]["tok_s"]
    rows = [[name, r["seconds"], r["tokens"], r["tok_s"], f"{r['tok_s'] / base:.3f}",
             f"{r['ttft'][0] * 1e3:.0f} / {r['ttft'][1] * 1e3:.0f}",
             f"{r['itl'][0] * 1e3:.0f} / {r['itl'][1] * 1e3:.0f}", f"{r['others']:.2f}"]
            for name, r in results.items()]
    table = markdown_table(["system", "seconds", "output tokens", "output tok/s", "vs python API",
                            "TTFT p50 / p99 (ms)", "ITL p50 / p99 (ms)", "cores busy elsewhere"], rows)
    note = (f"{len(chats)} chat requests sent at once, output {min(lengths)}..{max(lengths)} tokens (EOS ignored, "
            f"greedy), engine {ENGINE}; HTTP: streaming clients over loopback, one connection each, the server "
            f"in its own process. 'cores busy elsewhere': CPU used by other people's processes during the "
            f"timed part (of 2 cores), neither this benchmark nor its server.")
    print(table + "\n\n" + note)
    if args.write:
        command = ".venv/bin/python benchmarks/serving.py" + (" --quick" if args.quick else "") + " --write"
        write_section("Serving", command, f"### HTTP server vs in-process API\n\n{table}\n\n{note}")


if __name__ == "__main__":
    main()
