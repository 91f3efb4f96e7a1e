"""`llmos run | ps | kill | suspend | resume | renice | wait | logs | send | audit`: agents,
steered over HTTP against a running server (`--url`, default $LLMOS_URL or the local
server). The API key comes from $LLMOS_API_KEY, else $LLMOS_HOME/api_key."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from llmos.config import llmos_home, parse_size
from llmos.errors import LLMOSError

FINAL = ("exited", "killed", "failed")
LIMITS = ("max_tokens", "kv_quota", "max_wall", "max_memory", "max_cpu", "max_children", "max_pids")


class Server:
    """The llmos server's process API, with the caller's API key; every failure becomes an
    LLMOSError carrying the server's own message."""

    def __init__(self, url: str | None) -> None:
        import httpx
        self.url = (url or os.environ.get("LLMOS_URL") or "http://127.0.0.1:8000").rstrip("/")
        key = os.environ.get("LLMOS_API_KEY")
        if not key and (llmos_home() / "api_key").exists():
            key = (llmos_home() / "api_key").read_text().strip()
        self.http = httpx.Client(base_url=self.url, timeout=60,
                                 headers={"Authorization": f"Bearer {key}"} if key else {})

    def request(self, method: str, path: str, **kw):
        import httpx
        try:
            r = self.http.request(method, path, **kw)
        except httpx.ConnectError:
            raise LLMOSError(f"cannot reach the llmos server at {self.url} (is `llmos serve` running? --url)") from None
        except httpx.TransportError as e:
            raise LLMOSError(f"lost the llmos server at {self.url}: {e or type(e).__name__}") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text or f"HTTP {r.status_code}"
            raise LLMOSError(message)
        return r

    def wait(self, pid: int) -> dict:
        while True:
            r = self.request("GET", f"/v1/processes/{pid}/wait", params={"timeout": 20}).json()
            if r["done"]:
                return r


def _exit_status(code: int | None) -> int:
    """A shell's exit status for a process's exit code (128 + N for killed by signal N)."""
    if code is None:
        return 1
    return 128 - code if code < 0 else code


# What --dir leaves out of an upload: nothing a program imports lives there.
_SKIP_DIRS = {"__pycache__", ".git", ".venv", "venv", "node_modules", ".mypy_cache", ".pytest_cache"}
MAX_UPLOAD_FILES = 1000


def upload_program(s: Server, path: str, directory: str | None) -> str:
    """Stores the program (and with `directory`, every file under it) in the tenant's
    storage under programs/<name>/ and returns the program's path there, which a tenant
    key may spawn. Sibling modules import from the same directory once it runs."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise LLMOSError(f"path: no such file {path!r}")
    root = os.path.abspath(directory) if directory else os.path.dirname(path)
    if directory and not os.path.isdir(root):
        raise LLMOSError(f"--dir: no such directory {directory!r}")
    if os.path.commonpath([root, path]) != root:
        raise LLMOSError(f"path: {path!r} is not inside --dir {root!r}")
    files = [path]
    if directory:
        files = []
        for here, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
            files += [os.path.join(here, n) for n in sorted(names) if not n.endswith((".pyc", ".pyo"))]
        if len(files) > MAX_UPLOAD_FILES:
            raise LLMOSError(f"--dir: {root!r} holds {len(files)} files, more than {MAX_UPLOAD_FILES}; "
                             f"point --dir at the program's own directory")
    stem = os.path.basename(root) if directory else os.path.splitext(os.path.basename(path))[0]
    prefix = f"programs/{stem or 'agent'}"
    for f in files:
        with open(f, "rb") as fh:
            s.request("PUT", f"/v1/fs/{prefix}/{os.path.relpath(f, root)}", content=fh.read())
    return f"{prefix}/{os.path.relpath(path, root)}"


def cmd_run(args) -> int:
    from llmos.agent.run import is_entry_point, resolve_program
    s = Server(args.url)
    limits = {k: getattr(args, k) for k in LIMITS if getattr(args, k) is not None}
    body = {"name": args.name, "caps": args.cap, "args": args.args, "restart": args.restart,
            "durable": args.durable, "limits": limits, "weight": args.weight}
    if is_entry_point(args.path) or args.host:
        # module:function, or a file where the server can read it: an admin key's to run.
        body.update(path=resolve_program(args.path, os.getcwd()), cwd=os.getcwd())
    else:
        body["path"] = upload_program(s, args.path, args.dir)
    if args.priority is not None:
        body["priority"] = args.priority
    proc = s.request("POST", "/v1/processes", json=body).json()
    print(proc["pid"], flush=True)
    if args.wait:
        return _exit_status(s.wait(proc["pid"])["exit_code"])
    return 0


def cmd_ps(args) -> int:
    rows = Server(args.url).request("GET", "/v1/processes", params={"all": str(args.all).lower()}).json()["data"]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'PID':>6} {'PPID':>6} {'NAME':<24} {'STATE':<10} {'EXIT':>5} {'RESTARTS':>8} {'TENANT':<12} "
          f"{'PRI':>4} {'TOKENS':>8} {'CONFINEMENT':<12}")
    for p in rows:
        code = "-" if p.get("exit_code") is None else p["exit_code"]
        tokens = (p.get("prompt_tokens") or 0) + (p.get("output_tokens") or 0)
        print(f"{p['pid']:>6} {p.get('ppid') or '-':>6} {str(p.get('name') or '-')[:24]:<24} {p['state']:<10} "
              f"{code:>5} {p.get('restarts', 0):>8} {str(p.get('tenant') or '-')[:12]:<12} {p.get('priority', 0):>4} "
              f"{tokens:>8} {p.get('confinement') or '-':<12}")
    return 0


def cmd_action(args) -> int:
    r = Server(args.url).request("POST", f"/v1/processes/{args.pid}/{args.command}").json()
    print(f"{r['pid']}: {r['state']}")
    return 0 if r["ok"] else 1


def cmd_renice(args) -> int:
    r = Server(args.url).request("POST", f"/v1/processes/{args.pid}/renice",
                                 json={"priority": args.priority, "weight": args.weight}).json()
    print(f"{r['pid']}: priority {r['priority']}, weight {r['weight']:g}")
    return 0 if r["ok"] else 1


def cmd_wait(args) -> int:
    r = Server(args.url).wait(args.pid)
    how = r.get("state", "ended") + (f" ({r['reason']})" if r.get("reason") else "")
    print(f"{args.pid}: {how}, exit code {r['exit_code']}")
    return _exit_status(r["exit_code"])


def cmd_logs(args) -> int:
    s = Server(args.url)
    offset = 0
    while True:
        r = s.request("GET", f"/v1/processes/{args.pid}/logs", params={"offset": offset})
        sys.stdout.buffer.write(r.content)
        sys.stdout.flush()
        offset = int(r.headers.get("X-Log-Size", offset + len(r.content)))
        if not args.follow or s.request("GET", f"/v1/processes/{args.pid}").json()["state"] in FINAL:
            if args.follow:   # what it wrote between the last read and its end
                sys.stdout.buffer.write(s.request("GET", f"/v1/processes/{args.pid}/logs",
                                                  params={"offset": offset}).content)
            return 0
        time.sleep(0.5)


def cmd_send(args) -> int:
    try:
        body = json.loads(args.json)
    except ValueError as e:
        raise LLMOSError(f"JSON: not valid JSON: {e}") from None
    to = int(args.name) if args.name.isdigit() else args.name
    print(Server(args.url).request("POST", "/v1/messages", json={"to": to, "body": body}).json()["id"])
    return 0


def cmd_audit(args) -> int:
    s = Server(args.url)
    if args.what == "verify":
        r = s.request("GET", "/v1/audit/verify").json()
        where = "" if r["first_bad"] is None else f"first bad record {r['first_bad']}: "
        print(f"audit log intact: {r['checked']} records" if r["ok"] else f"audit log TAMPERED: {where}{r['problem']}")
        return 0 if r["ok"] else 1
    params = {"limit": args.limit, **({"pid": args.pid} if args.pid is not None else {}),
              **({"denied": "true"} if args.denied else {})}
    rows = s.request("GET", "/v1/audit", params=params).json()["data"]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'TIME':<19} {'PID':>6} {'TENANT':<12} {'CALL':<16} {'MS':>7}  VERDICT -> OUTCOME")
    for r in rows:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"]))
        verdict = "allowed" if r["allowed"] else f"DENIED ({r.get('reason')})"
        ms = "-" if r.get("duration") is None else f"{r['duration'] * 1000:.1f}"
        print(f"{stamp:<19} {str(r.get('pid') or '-'):>6} {str(r.get('tenant') or '-')[:12]:<12} {r['call']:<16} "
              f"{ms:>7}  {verdict} -> {r.get('outcome')}")
    return 0


def _size(text: str) -> int:
    """An argparse type: bytes from "2GiB", so a bad size is a usage error (status 2)."""
    try:
        return parse_size(text)
    except LLMOSError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None


def add_commands(sub) -> None:
    def server_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=None, help="the llmos server (default $LLMOS_URL or http://127.0.0.1:8000)")

    p = sub.add_parser("run", help="start an agent program as a process; prints its pid")
    p.add_argument("path", help="a .py file (relative to here), uploaded into your tenant's storage and run from "
                                "there; or package.module:function (admin keys)")
    p.add_argument("--dir", default=None, help="upload this whole directory with the program (its sibling modules)")
    p.add_argument("--host", action="store_true",
                   help="admin keys: run the file where it lies on the server's machine, from this directory")
    p.add_argument("--name", default=None)
    p.add_argument("--cap", action="append", default=None, help="a capability (repeatable); none given: all")
    p.add_argument("--max-tokens", type=int, default=None, help="LLM tokens over the process's life")
    p.add_argument("--kv-quota", type=int, default=None, help="KV blocks its requests may hold at once")
    p.add_argument("--max-wall", type=float, default=None, help="seconds of wall-clock time")
    p.add_argument("--max-memory", type=_size, default=None, help="address space, e.g. 2GiB")
    p.add_argument("--max-cpu", type=int, default=None, help="CPU seconds")
    p.add_argument("--max-children", type=int, default=None)
    p.add_argument("--max-pids", type=int, default=None, help="OS processes and threads at once")
    p.add_argument("--priority", type=int, default=None, help="lower runs first")
    p.add_argument("--weight", type=float, default=1.0, help="its share of the tenant's part under fair scheduling")
    p.add_argument("--restart", choices=["never", "on-failure", "always"], default="never")
    p.add_argument("--durable", action="store_true", help="journal its system calls; replay them after a restart")
    p.add_argument("--wait", action="store_true", help="wait for it and exit with its exit code")
    p.add_argument("args", nargs="*", help="the program's arguments (after --)")
    server_arg(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("ps", help="list agent processes")
    p.add_argument("--all", action="store_true", help="include ended ones")
    p.add_argument("--json", action="store_true")
    server_arg(p)
    p.set_defaults(func=cmd_ps)
    for name, help_text in (("kill", "end a process and its children (SIGTERM, then SIGKILL)"),
                            ("suspend", "stop a process and take its LLM requests' KV out of the pool"),
                            ("resume", "continue a suspended process")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("pid", type=int)
        server_arg(p)
        p.set_defaults(func=cmd_action)
    p = sub.add_parser("renice", help="change a process's priority and weight, its queued requests' too")
    p.add_argument("pid", type=int)
    p.add_argument("--priority", type=int, required=True)
    p.add_argument("--weight", type=float, default=None)
    server_arg(p)
    p.set_defaults(func=cmd_renice)
    p = sub.add_parser("wait", help="wait for a process to end; exits with its exit code")
    p.add_argument("pid", type=int)
    server_arg(p)
    p.set_defaults(func=cmd_wait)
    p = sub.add_parser("logs", help="a process's stdout and stderr")
    p.add_argument("pid", type=int)
    p.add_argument("-f", "--follow", action="store_true")
    server_arg(p)
    p.set_defaults(func=cmd_logs)
    p = sub.add_parser("send", help="send a JSON message to a process, by name or pid")
    p.add_argument("name")
    p.add_argument("json")
    server_arg(p)
    p.set_defaults(func=cmd_send)
    p = sub.add_parser("audit", help="the system call audit log; `llmos audit verify` checks its hash chain")
    p.add_argument("what", nargs="?", choices=["verify"], default=None)
    p.add_argument("--pid", type=int, default=None)
    p.add_argument("--denied", action="store_true", help="only refused calls")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    server_arg(p)
    p.set_defaults(func=cmd_audit)
    from llmos.cli_library import add_commands as library_commands
    library_commands(sub, server_arg)


