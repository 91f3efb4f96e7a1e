"""A/B of two checkouts of llmos on the throughput benchmark's batch workload, each run in
a process of its own, interleaved A B A B: did a change make the engine slower?

    python benchmarks/ab_layers.py BEFORE_ROOT AFTER_ROOT [--rounds 2] [--requests 64]

Each run steps an LLMEngine directly (no HTTP, no loop thread) through 64 chat requests
with greedy outputs of 26..251 tokens, and reports output tokens per second of its own
wall-clock time and of its own CPU time (less sensitive to other load on the machine)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, os, sys, time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
root = sys.argv[1]
sys.path.insert(0, root)
import torch
from benchmarks.throughput import workload, greedy, WARMUP
from llmos.config import EngineConfig
from llmos.engine.llm_engine import LLMEngine
import llmos
assert llmos.__file__.startswith(root), llmos.__file__
n = int(sys.argv[2])
e = LLMEngine(EngineConfig(model="smollm2-135m", kv_cache_memory="1GiB", max_num_seqs=64))
def drive(chats, params):
    seqs = [e.add_request(c, p) for c, p in zip(chats, params)]
    while e.has_unfinished():
        e.step()
    return seqs
drive([WARMUP], [greedy(8)])
chats, lengths = workload(n)
t, c = time.perf_counter(), time.process_time()
seqs = drive(chats, [greedy(k) for k in lengths])
wall, cpu = time.perf_counter() - t, time.process_time() - c
toks = sum(len(s.output_token_ids) for s in seqs)
print(json.dumps({"tokens": toks, "wall": wall, "cpu": cpu}))
"""


def run(root: str, n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(root), str(n)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    args = ap.parse_args()
    res: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name in ("before", "after"):
            r = run(getattr(args, name), args.requests)
            res[name].append(r)
            print(name, r, flush=True)
    for name, rs in res.items():
        print(f"{name}: median {statistics.median(r['tokens'] / r['wall'] for r in rs):.1f} tok/s wall, "
              f"{statistics.median(r['tokens'] / r['cpu'] for r in rs):.1f} tok/s per CPU second")
    b = statistics.median(r["tokens"] / r["wall"] for r in res["before"])
    a = statistics.median(r["tokens"] / r["wall"] for r in res["after"])
    print(f"after / before (wall): {a / b:.3f}")


if __name__ == "__main__":
    main()
