"""`llmos top`: the dashboard in a terminal, for a server reached over ssh. A header with
throughput, requests by state, KV pool, swap tier, prefix cache, latency, CPU and memory;
then the requests and the agent processes, sortable, with keys to act on the selected row.
`--once` prints one snapshot and exits (scriptable; `--json` for the raw sample)."""

from __future__ import annotations

import json
import os
import select
import sys
import time

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from llmos.cli_agents import Server
from llmos.errors import LLMOSError

REQUEST_SORTS = {"id": "request_id", "tenant": "tenant", "priority": "priority", "state": "state",
                 "tokens": "output_tokens", "prompt": "prompt_tokens", "kv": "kv_blocks", "waiting": "waiting_s"}
PROCESS_SORTS = {"pid": "pid", "name": "name", "state": "state", "tenant": "tenant", "priority": "priority",
                 "tokens": "tokens", "cpu": "cpu_seconds", "rss": "peak_rss"}
HELP = "q quit  tab requests/processes  ↑↓/jk select  s sort  S reverse  c cancel/kill  z suspend  r resume  +/- renice"


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _bar(used: int, total: int, width: int = 24) -> str:
    filled = round(width * used / total) if total else 0
    return "█" * filled + "░" * (width - filled)


class Top:
    def __init__(self, server: Server, sort: str = "priority", reverse: bool = False) -> None:
        self.server = server
        self.sample: dict = {}
        self.processes: list[dict] = []
        self.pane = "requests"
        self.sort = {"requests": sort if sort in REQUEST_SORTS else "priority",
                     "processes": sort if sort in PROCESS_SORTS else "pid"}
        self.reverse = reverse
        self.selected = 0
        self.message = ""

    def refresh(self) -> None:
        self.sample = self.server.request("GET", "/v1/dashboard/snapshot").json()
        self.processes = self.server.request("GET", "/v1/processes").json()["data"]
        for p in self.processes:
            p["tokens"] = (p.get("prompt_tokens") or 0) + (p.get("output_tokens") or 0)

    # -- rows ------------------------------------------------------------------------------
    def rows(self, pane: str | None = None) -> list[dict]:
        pane = pane or self.pane
        rows = list(self.sample.get("rows", [])) if pane == "requests" else list(self.processes)
        key = (REQUEST_SORTS if pane == "requests" else PROCESS_SORTS)[self.sort[pane]]
        rows.sort(key=lambda r: (r.get(key) is None, r.get(key) if r.get(key) is not None else 0),
                  reverse=self.reverse)
        return rows

    def header(self) -> Panel:
        s = self.sample
        tps, req, kv, swap = s["tokens_per_s"], s["requests"], s["kv"], s["swap"]
        lat, srv, pc = s["latency"], s["server"], s["prefix_cache"]
        lines = [
            f"tokens/s  prompt {tps['prompt']:>8.1f}   output {tps['output']:>7.1f}      "
            f"requests  running {req['running']}  waiting {req['waiting']}  swapped {req['swapped']}  "
            f"suspended {req['suspended']}",
            f"KV pool   {_bar(kv['used'], kv['total'])} {kv['used']}/{kv['total']} blocks "
            f"({kv['cached']} cached, {_size(kv['used'] * kv['block_bytes'])})   "
            f"prefix hit rate {pc['hit_rate'] * 100:.1f}%",
            f"swap      host {_size(swap['host_bytes'])} of {_size(swap['host_budget'])}   "
            f"disk {_size(swap['disk_bytes'])}   {swap['swapped_requests']} request(s) swapped out",
            f"latency   TTFT p50 {_ms(lat['ttft']['p50'])}  p99 {_ms(lat['ttft']['p99'])}   "
            f"inter-token p50 {_ms(lat['itl']['p50'])}  p99 {_ms(lat['itl']['p99'])}   "
            f"server CPU {srv['cpu_percent']:.0f}%  RSS {_size(srv['rss_bytes'])}",
        ]
        return Panel("\n".join(lines), title=f"llmos top  ({s.get('scheduling_policy', '?')} scheduling)",
                     title_align="left")

    def table(self, pane: str, interactive: bool) -> Table:
        rows = self.rows(pane)
        active = interactive and pane == self.pane
        arrow = " ↓" if not self.reverse else " ↑"
        if pane == "requests":
            cols = [("REQUEST", "id"), ("TENANT", "tenant"), ("PRI", "priority"), ("STATE", "state"),
                    ("PROMPT", "prompt"), ("TOKENS", "tokens"), ("KV", "kv"), ("WAITED", "waiting")]
        else:
            cols = [("PID", "pid"), ("PPID", None), ("NAME", "name"), ("STATE", "state"), ("TENANT", "tenant"),
                    ("PRI", "priority"), ("TOKENS", "tokens"), ("CPU s", "cpu"), ("PEAK RSS", "rss")]
        t = Table(title=f"{pane} ({len(rows)})", title_justify="left", expand=True,
                  border_style="bold" if active else "dim")
        for name, key in cols:
            sorted_here = key is not None and key == self.sort[pane]
            t.add_column(name + (arrow if sorted_here else ""), no_wrap=True,
                         justify="left" if name in ("REQUEST", "TENANT", "STATE", "NAME") else "right")
        for i, r in enumerate(rows):
            if pane == "requests":
                cells = [r["request_id"], r["tenant"], str(r["priority"]), r["state"], str(r["prompt_tokens"]),
                         str(r["output_tokens"]), str(r["kv_blocks"]), f"{r.get('waiting_s', 0):.1f}s"]
            else:
                cells = [str(r["pid"]), str(r.get("ppid") or "-"), str(r.get("name") or "-"), r["state"],
                         str(r.get("tenant") or "-"), str(r.get("priority", 0)), str(r["tokens"]),
                         f"{r.get('cpu_seconds') or 0:.1f}", _size(r.get("peak_rss"))]
            t.add_row(*cells, style="reverse" if active and i == self.selected else None)
        return t

    def render(self, interactive: bool = False) -> Group:
        parts = [self.header(), self.table("requests", interactive), self.table("processes", interactive)]
        if interactive:
            parts.append(Text(self.message or HELP, style="dim" if not self.message else "bold"))
        return Group(*parts)

    # -- keys --------------------------------------------------------------------------------
    def key(self, k: str) -> bool:
        """Act on one key press; False to quit."""
        rows = self.rows()
        if k in ("q", "\x03"):
            return False
        if k == "\t":
            self.pane = "processes" if self.pane == "requests" else "requests"
            self.selected = 0
        elif k in ("j", "\x1b[B"):
            self.selected = min(self.selected + 1, max(0, len(rows) - 1))
        elif k in ("k", "\x1b[A"):
            self.selected = max(0, self.selected - 1)
        elif k == "s":
            keys = list(REQUEST_SORTS if self.pane == "requests" else PROCESS_SORTS)
            self.sort[self.pane] = keys[(keys.index(self.sort[self.pane]) + 1) % len(keys)]
        elif k == "S":
            self.reverse = not self.reverse
        elif k in "czr+-" and rows:
            self.act(rows[min(self.selected, len(rows) - 1)], k)
        return True

    def act(self, row: dict, k: str) -> None:
        try:
            if self.pane == "requests":
                base = f"/v1/kernel/requests/{row['request_id']}"
                if k in "+-":
                    body = {"priority": row["priority"] + (1 if k == "+" else -1)}
                    r = self.server.request("POST", f"{base}/priority", json=body).json()
                else:
                    r = self.server.request("POST", f"{base}/{dict(c='cancel', z='suspend', r='resume')[k]}").json()
                self.message = f"{row['request_id']}: {r['action']} -> {r['state']}"
            else:
                base = f"/v1/processes/{row['pid']}"
                if k in "+-":
                    body = {"priority": row.get("priority", 0) + (1 if k == "+" else -1)}
                    r = self.server.request("POST", f"{base}/renice", json=body).json()
                else:
                    r = self.server.request("POST", f"{base}/{dict(c='kill', z='suspend', r='resume')[k]}").json()
                self.message = f"pid {row['pid']}: {r['action']} -> {r['state']}"
        except LLMOSError as e:
            self.message = f"refused: {e}"


def _read_keys(timeout: float) -> list[str]:
    """Key presses waiting on stdin (the terminal is in cbreak mode), escape sequences whole."""
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    if not ready:
        return []
    data = os.read(sys.stdin.fileno(), 64).decode(errors="ignore")
    keys, i = [], 0
    while i < len(data):
        if data[i] == "\x1b" and data[i + 1:i + 2] == "[":
            keys.append(data[i:i + 3])
            i += 3
        else:
            keys.append(data[i])
            i += 1
    return keys


def cmd_top(args) -> int:
    top = Top(Server(args.url), sort=args.sort, reverse=args.reverse)
    if args.once:
        top.refresh()
        if args.json:
            print(json.dumps({"sample": top.sample, "processes": top.processes}, indent=1))
        else:
            Console(width=args.width or None).print(top.render())
        return 0
    if not sys.stdin.isatty():
        raise LLMOSError("`llmos top` needs a terminal for its keys; use `llmos top --once` in scripts")
    import termios
    import tty
    saved = termios.tcgetattr(sys.stdin)
    try:
        tty.setcbreak(sys.stdin.fileno())
        top.refresh()
        with Live(top.render(True), screen=True, auto_refresh=False) as live:
            next_refresh = time.monotonic() + args.interval
            while True:
                for k in _read_keys(max(0.0, next_refresh - time.monotonic())):
                    if not top.key(k):
                        return 0
                    live.update(top.render(True), refresh=True)
                if time.monotonic() >= next_refresh:
                    top.refresh()
                    live.update(top.render(True), refresh=True)
                    next_refresh = time.monotonic() + args.interval
    finally:
        termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)


def add_commands(sub) -> None:
    p = sub.add_parser("top", help="live view of requests, processes and memory of a running server")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--json", action="store_true", help="with --once: the raw sample as JSON")
    p.add_argument("--sort", default="priority", choices=sorted(set(REQUEST_SORTS) | set(PROCESS_SORTS)),
                   help="the column rows are sorted by (default priority for requests, pid for processes)")
    p.add_argument("--reverse", action="store_true", help="sort descending")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--width", type=int, default=None, help="with --once: columns to print in")
    p.add_argument("--url", default=None, help="the llmos server (default $LLMOS_URL or http://127.0.0.1:8000)")
    p.set_defaults(func=cmd_top)
