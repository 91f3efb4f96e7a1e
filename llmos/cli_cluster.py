"""`llmos cluster status | scale N`: the engine replicas of a server started with
`llmos serve --cluster`, over HTTP (admin key)."""

from __future__ import annotations

import json

from llmos.cli_agents import Server


def _print(status: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(status, indent=1))
        return
    print(f"{'REPLICA':>7} {'STATE':<9} {'PID':>8} {'NODE':<16} {'RUNNING':>7} {'KV USED':>10} {'RESTARTS':>8} "
          f"{'TOKENS':>9}  RECOVERY")
    for r in status["replicas"]:
        tokens = "-" if not r.get("stats") else r["stats"]["tokens"]["prompt"] + r["stats"]["tokens"]["generated"]
        recovery = ", ".join(f"{s:.1f}s" for s in r["recovery_seconds"]) or "-"
        print(f"{r['index']:>7} {r['state']:<9} {r['pid'] or '-':>8} {str(r['node'] or '-')[:16]:<16} "
              f"{r['inflight']:>7} {r['kv_used']:>4}/{r['kv_total']:<5} {r['restarts']:>8} {tokens:>9}  {recovery}")
    ro = status["routing"]
    print(f"router: {ro['routed']} placed, {ro['affinity_routed']} by prefix affinity, {ro['queued']} queued; "
          f"{ro['prefix_blocks_matched']}/{ro['prefix_blocks_queried']} leading blocks found where they went")


def cmd_cluster(args) -> int:
    server = Server(args.url)
    if args.action == "status":
        _print(server.request("GET", "/v1/cluster").json(), args.json)
    else:
        body = {"replicas": args.replicas, "timeout": args.timeout}
        _print(server.request("POST", "/v1/cluster/scale", json=body, timeout=args.timeout + 600).json(), args.json)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("cluster", help="engine replicas of a `llmos serve --cluster` server")
    actions = p.add_subparsers(dest="action", required=True)
    for name, help_text in (("status", "each replica: state, load, restarts, recovery times"),
                            ("scale", "run N replicas from now on (adds, or drains and removes)")):
        a = actions.add_parser(name, help=help_text)
        if name == "scale":
            a.add_argument("replicas", type=int)
            a.add_argument("--timeout", type=float, default=60.0,
                           help="seconds removed replicas may take to finish their requests")
        a.add_argument("--json", action="store_true")
        a.add_argument("--url", default=None, help="the llmos server (default $LLMOS_URL or http://127.0.0.1:8000)")
        a.set_defaults(func=cmd_cluster)
