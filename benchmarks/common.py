"""Helpers shared by the benchmarks: machine probes, peak memory, and the results file.

Absolute speeds drift with the load other processes put on the machine, so each benchmark
probes the machine's own GEMM rate and memory bandwidth in the same run and reports
ratios to them (MFU, MBU) rather than bare numbers.
"""

from __future__ import annotations

import datetime
import os
import re
import resource
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def best_time(fn, repeats: int) -> float:
    """Fastest of `repeats` calls after one warm-up: the machine's capability, not its load."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gemm_flops(n: int = 1024, repeats: int = 30) -> float:
    """FLOP/s of an n x n x n float32 matmul on torch's current threads: the peak MFU divides by."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    return 2 * n**3 / best_time(lambda: torch.mm(a, b, out=out), repeats)


def memory_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 10) -> float:
    """Bytes/s read by summing a float32 tensor far larger than the caches: decode streams
    its weights the same way, read-only, once per step."""
    x = torch.ones(nbytes // 4)
    return nbytes / best_time(x.sum, repeats)


class MachinePeak:
    """The best GEMM FLOP/s and read bandwidth over probes spread across a run: on a CPU
    shared with other jobs any single probe may land in a busy moment, so MFU and MBU
    are taken against what the machine did at its least busy."""

    def __init__(self) -> None:
        self.flops = self.bandwidth = 0.0

    def sample(self, memory: bool = True) -> None:
        """memory=False skips the bandwidth probe, whose buffer would show in a peak RSS window."""
        self.flops = max(self.flops, gemm_flops())
        if memory:
            self.bandwidth = max(self.bandwidth, memory_bandwidth())


def cpu_seconds() -> tuple[float, float]:
    """CPU-seconds used so far by the whole machine and by this process with its finished
    children; over a run, the difference is the load other people put on the cores the
    benchmark was timed on."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")   # all but idle, iowait
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: /proc/self/clear_refs), so two systems run in one
    process each get their own peak; elsewhere the peak stays the process's lifetime one."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Bytes of the largest resident set since reset_peak_rss (or since the process began)."""
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, command: str, body: str, path: Path = RESULTS) -> None:
    """Adds '## name (today)' with the command that produced it to the results file,
    replacing a section of the same name and date, so a rerun on one day keeps one copy."""
    title = f"## {name} ({datetime.date.today().isoformat()})"
    section = f"{title}\n\n```\n{command}\n```\n\n{body.strip()}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    parts = re.split(r"(?m)^(?=## )", text)
    if title in (p.split("\n", 1)[0] for p in parts):
        parts = [section + "\n" if p.split("\n", 1)[0] == title else p for p in parts]
    else:
        parts[-1] = parts[-1].rstrip("\n") + "\n\n"
        parts.append(section)
    path.write_text("".join(parts).rstrip("\n") + "\n")


class LocalServer:
    """`llmos serve --no-auth` on a free loopback port in a subprocess of its own, with its
    own keys database and agents directory (kept when `home` is given, so a second server
    can take over after the first is killed)."""

    def __init__(self, home: Path, engine: dict | None = None, server: dict | None = None,
                 cluster: dict | None = None, env: dict | None = None, agents: dict | None = None) -> None:
        import json
        import socket
        import subprocess
        import sys
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        sets = {"server.keys_db": str(self.home / "keys.db"), "server.agents_dir": str(self.home / "agents"),
                "server.log_level": "warning", **{f"engine.{k}": v for k, v in (engine or {}).items()},
                **{f"server.{k}": v for k, v in (server or {}).items()},
                **{f"cluster.{k}": v for k, v in (cluster or {}).items()},
                **{f"agents.{k}": v for k, v in (agents or {}).items()}}
        cmd = [sys.executable, "-m", "llmos.cli", "serve", "--no-auth", "--port", str(self.port)]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={json.dumps(v)}"]
        self.proc = subprocess.Popen(cmd, stdout=(self.home / "server.log").open("a"), stderr=subprocess.STDOUT,
                                     env=None if env is None else {**os.environ, **env})
        self.started = time.perf_counter()
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 300) -> float:
        """Seconds from start until /health answered."""
        import httpx
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(self.home / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not come up")

    def stop(self, sig: int | None = None) -> None:
        if self.proc.poll() is None:
            self.proc.terminate() if sig is None else self.proc.send_signal(sig)
            self.proc.wait(60)
