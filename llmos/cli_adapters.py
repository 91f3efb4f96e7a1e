"""`llmos adapters list | load NAME PATH | unload NAME`: the LoRA adapters a running server
serves, over HTTP (`--url`, the API key as for `llmos ps`); load and unload need an admin key."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmos.cli_agents import Server


def cmd_list(args) -> int:
    rows = Server(args.url).request("GET", "/v1/adapters").json()["data"]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no adapters; load one with: llmos adapters load NAME PATH")
        return 0
    print(f"{'MODEL':<36} {'FORMAT':<6} {'RANK':>4} {'MiB':>7} {'RESIDENT':<8} {'ACTIVE':>6}  TARGETS")
    for a in rows:
        print(f"{a['id']:<36} {a['format']:<6} {a['rank']:>4} {a['bytes'] / 2**20:>7.1f} "
              f"{'yes' if a['resident'] else 'no':<8} {a['active_requests']:>6}  {','.join(a['targets'])}")
    return 0


def cmd_load(args) -> int:
    # The server reads the path, so a relative one is made absolute here, where it was meant.
    body = {"name": args.name, "path": str(Path.cwd() / Path(args.path).expanduser())}
    if args.tenant:
        body["tenants"] = args.tenant
    a = Server(args.url).request("POST", "/v1/adapters", json=body).json()
    print(f"loaded {a['id']}: {a['format']}, rank {a['rank']}, {a['bytes'] / 2**20:.1f} MiB, "
          f"targets {','.join(a['targets'])}")
    return 0


def cmd_unload(args) -> int:
    a = Server(args.url).request("DELETE", f"/v1/adapters/{args.name}").json()
    print(f"unloaded {a['id']}")
    return 0


def add_commands(sub) -> None:
    adapters = sub.add_parser("adapters", help="LoRA adapters on a running server: list | load | unload")
    verbs = adapters.add_subparsers(dest="adapters_command", required=True)

    def server_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=None, help="the llmos server (default $LLMOS_URL or http://127.0.0.1:8000)")

    p = verbs.add_parser("list", help="the adapters this key may use (all, for an admin key)")
    p.add_argument("--json", action="store_true")
    server_arg(p)
    p.set_defaults(func=cmd_list)
    p = verbs.add_parser("load", help="load a PEFT adapter directory or GGUF LoRA file (admin)")
    p.add_argument("name", help="requests then use model BASE:NAME")
    p.add_argument("path", help="a PEFT directory (adapter_config.json + adapter_model.safetensors) or a .gguf")
    p.add_argument("--tenant", action="append", default=None,
                   help="a tenant that may use it (repeatable); none given: every tenant")
    server_arg(p)
    p.set_defaults(func=cmd_load)
    p = verbs.add_parser("unload", help="forget an adapter (admin); refused while requests use it")
    p.add_argument("name")
    server_arg(p)
    p.set_defaults(func=cmd_unload)
