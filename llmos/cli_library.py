"""`llmos tools | approvals | approve | deny | fs`: the function library and the tenant's
files, for people, over HTTP against a running server (as `llmos ps` and friends)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from urllib.parse import quote

from llmos.cli_agents import Server
from llmos.errors import LLMOSError


def cmd_tools(args) -> int:
    rows = Server(args.url).request("GET", "/v1/tools").json()["data"]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'NAME':<28} {'SOURCE':<8} {'APPROVAL':<8} DESCRIPTION")
    for t in rows:
        print(f"{t['name']:<28} {t['source']:<8} {'yes' if t['needs_approval'] else '-':<8} "
              f"{t['description'][:80]}")
    return 0


def cmd_approvals(args) -> int:
    params = {} if args.all else {"state": "pending"}
    rows = Server(args.url).request("GET", "/v1/approvals", params=params).json()["data"]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'ID':<13} {'PID':>6} {'TENANT':<12} {'TOOL':<20} {'STATE':<9} {'DEADLINE':<19} ARGUMENTS")
    for a in rows:
        deadline = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a["deadline"]))
        print(f"{a['id']:<13} {a['pid']:>6} {a['tenant'][:12]:<12} {a['tool'][:20]:<20} {a['state']:<9} "
              f"{deadline:<19} {json.dumps(a['args'])[:60]}")
    return 0


def cmd_decide(args) -> int:
    body = {"reason": args.reason} if args.reason else {}
    a = Server(args.url).request("POST", f"/v1/approvals/{args.id}/{args.command}", json=body).json()
    print(f"{a['id']}: {a['state']} ({a['tool']} for process {a['pid']})")
    return 0


def cmd_fs(args) -> int:
    s = Server(args.url)
    if args.action == "ls":
        for e in s.request("GET", "/v1/fs", params={"path": args.path or ""}).json()["entries"]:
            kind = "d" if e.get("type") == "dir" or e.get("is_dir") else "-"
            print(f"{kind} {e.get('size', 0):>10} {e['name']}")
        return 0
    if not args.path:
        raise LLMOSError(f"path: `llmos fs {args.action}` needs a path")
    where = "/v1/fs/" + quote(args.path, safe="")       # as it is: no client may resolve its ".."
    if args.action == "cat":
        sys.stdout.buffer.write(s.request("GET", where).content)
        sys.stdout.flush()
    elif args.action == "put":
        data = sys.stdin.buffer.read() if args.source in (None, "-") else _read(args.source)
        r = s.request("PUT", where, content=data).json()
        print(f"{r['path']}: {r['bytes']} bytes")
    else:
        s.request("DELETE", where)
        print(f"{args.path}: deleted")
    return 0


def _read(source: str) -> bytes:
    try:
        return Path(source).read_bytes()
    except OSError as e:
        raise LLMOSError(f"source: cannot read {source}: {e.strerror}") from None


def add_commands(sub, server_arg) -> None:
    p = sub.add_parser("tools", help="the tools agents and chats can call (built-in, config modules, MCP)")
    p.add_argument("--json", action="store_true")
    server_arg(p)
    p.set_defaults(func=cmd_tools)
    p = sub.add_parser("approvals", help="tool calls waiting for a person's approve or deny")
    p.add_argument("--all", action="store_true", help="decided ones too")
    p.add_argument("--json", action="store_true")
    server_arg(p)
    p.set_defaults(func=cmd_approvals)
    for name, help_text in (("approve", "let a waiting tool call run (exactly once)"),
                            ("deny", "refuse a waiting tool call; the agent gets a structured refusal")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("id")
        p.add_argument("--reason", default=None)
        server_arg(p)
        p.set_defaults(func=cmd_decide)
    p = sub.add_parser("fs", help="the tenant's files: ls [DIR] | cat PATH | put PATH [SOURCE|-] | rm PATH")
    p.add_argument("action", choices=["ls", "cat", "put", "rm"])
    p.add_argument("path", nargs="?", default="")
    p.add_argument("source", nargs="?", default=None, help="put: a local file, or - (the default) for stdin")
    server_arg(p)
    p.set_defaults(func=cmd_fs)
