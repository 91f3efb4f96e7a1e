"""Scheduling: the kernel's policies (fcfs, priority, rr, fair) side by side, in one run,
on the situations their promises are about.

1 fairness     tenant A queues 48 requests, then tenant B 4, at once (128 tokens each):
               B's mean completion time; then weights 2:1, both tenants backlogged.
2 priority     a high-priority request arrives while 16 long ones fill the batch: its time
               to first token, in steps of that batch.
3 switch       swap-out + swap-in of a 256/1024/2048-token context against recomputing it.
4 pressure     64 requests through a KV pool that holds 4 of them, against an unpressured run.
5 throughput   the throughput benchmark's 64 chat requests under fcfs and fair.
6 compression  int8 compression of swapped KV: bytes saved, output tokens changed.

Engines compared within a part take turns, one step each, and each keeps its own clock (the
wall-clock time of its own steps), so the load other jobs put on the shared CPU falls on
all of them alike. Step counts do not depend on load at all and are reported beside times.

    python benchmarks/scheduling.py [--quick] [--only N] [--write]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import gc
import multiprocessing
import os
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass

# Idle OpenMP threads sleep instead of spinning (measured in benchmarks/throughput.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# Runs from a checkout as `python benchmarks/scheduling.py`, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import RESULTS, cpu_seconds, markdown_table, peak_rss, reset_peak_rss  # noqa: E402
from benchmarks.throughput import WARMUP, workload  # noqa: E402

from llmos import SamplingParams  # noqa: E402
from llmos.config import EngineConfig  # noqa: E402
from llmos.engine.llm_engine import LLMEngine  # noqa: E402

MODEL = "smollm2-135m"
POLICIES = ("fcfs", "priority", "rr", "fair")
MiB = 2**20


@dataclass
class Sizes:
    seqs: int = 16                       # max_num_seqs in every part
    tenant_a: int = 48
    tenant_b: int = 4
    fair_tokens: int = 128
    weighted_requests: int = 24          # per tenant
    weighted_steps: int = 150
    priority_tokens: int = 256
    contexts: tuple[int, ...] = (256, 1024, 2048)
    reps: int = 5
    pressure_requests: int = 64
    pressure_tokens: int = 64
    throughput_requests: int = 64
    throughput_cap: int = 256            # longest output in the throughput workload
    compress_prompts: int = 8
    compress_tokens: int = 64


QUICK = Sizes(seqs=4, tenant_a=12, tenant_b=1, fair_tokens=16, weighted_requests=6, weighted_steps=40,
              priority_tokens=24, contexts=(64, 256), reps=2, pressure_requests=16, pressure_tokens=16,
              throughput_requests=8, throughput_cap=32, compress_prompts=4, compress_tokens=16)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def make_engine(seqs: int, policy: str = "fcfs", **settings) -> LLMEngine:
    """An engine whose one-time start-up costs are already paid by a short request (of its
    own tenant, so the measured tenants start from zero)."""
    e = LLMEngine(EngineConfig(model=MODEL, scheduling_policy=policy, max_num_seqs=seqs, **settings))
    e.add_request(WARMUP, greedy(4), tenant="warmup")
    while e.has_unfinished():
        e.step()
    return e


class Clocked:
    """An engine stepped by hand with its own clock: the steps it took and the wall-clock
    seconds they lasted, noted at each request's arrival, first token and finish."""

    def __init__(self, name: str, engine: LLMEngine) -> None:
        self.name, self.engine = name, engine
        self.steps, self.seconds = 0, 0.0
        self.added: dict[str, tuple[int, float]] = {}
        self.first: dict[str, tuple[int, float]] = {}
        self.done: dict[str, tuple[int, float]] = {}

    def add(self, prompt, params: SamplingParams, **kw) -> str:
        rid = self.engine.add_request(prompt, params, **kw).request_id
        self.added[rid] = (self.steps, self.seconds)
        return rid

    def step(self) -> None:
        t = time.perf_counter()
        deltas = self.engine.step()
        self.seconds += time.perf_counter() - t
        self.steps += 1
        for d in deltas:
            if d.token_ids:
                self.first.setdefault(d.request_id, (self.steps, self.seconds))
            if d.finished:
                self.done[d.request_id] = (self.steps, self.seconds)

    def since_added(self, marks: dict[str, tuple[int, float]], rids: list[str]) -> tuple[float, float]:
        """Mean (steps, seconds) from arrival to the given marks."""
        spans = [(marks[r][0] - self.added[r][0], marks[r][1] - self.added[r][1]) for r in rids]
        return statistics.mean(s for s, _ in spans), statistics.mean(t for _, t in spans)


def take_turns(runs: list[Clocked], done) -> None:
    """One step of each run in turn until done(run) holds for every run."""
    while active := [r for r in runs if not done(r)]:
        for r in active:
            r.step()


def preemptions(e: LLMEngine) -> str:
    p = e.kernel.switcher.num_preemptions
    return f"{p['swap']} / {p['recompute']}"


# -- 1. fairness ------------------------------------------------------------------------
def fairness(s: Sizes) -> str:
    chats, _ = workload(s.tenant_a + s.tenant_b)
    runs = [Clocked(p, make_engine(s.seqs, p)) for p in POLICIES]
    b_ids = {}
    for r in runs:
        for c in chats[:s.tenant_a]:
            r.add(c, greedy(s.fair_tokens), tenant="A")
        b_ids[r.name] = [r.add(c, greedy(s.fair_tokens), tenant="B") for c in chats[s.tenant_a:]]
    take_turns(runs, lambda r: all(i in r.done for i in b_ids[r.name]))
    spans = {r.name: r.since_added(r.done, b_ids[r.name]) for r in runs}
    base_steps, base_s = spans["fcfs"]
    rows = [[r.name, f"{spans[r.name][1]:.1f}", f"{spans[r.name][0]:.0f}", f"{spans[r.name][1] / base_s:.2f}",
             f"{spans[r.name][0] / base_steps:.2f}", preemptions(r.engine)] for r in runs]
    fair_ratio = spans["fair"][1] / base_s
    del runs   # four models and pools: let them go before the next engine loads
    gc.collect()

    # Weights 2:1, both tenants backlogged with requests longer than the window.
    r = Clocked("fair", make_engine(s.seqs, "fair"))
    r.engine.tenants.set("A", weight=2)
    chats, _ = workload(2 * s.weighted_requests)
    for tenant, group in (("A", chats[:s.weighted_requests]), ("B", chats[s.weighted_requests:])):
        for c in group:
            r.add(c, greedy(2 * s.weighted_steps), tenant=tenant)
    for _ in range(s.weighted_steps):
        r.step()
    a, b = r.engine.tenants.get("A"), r.engine.tenants.get("B")
    served, output = a.tokens_served / b.tokens_served, a.output_tokens / b.output_tokens
    slots = sum(1 for q in r.engine.scheduler.running if q.tenant == "A")
    weighted = (f"Weights A:B = 2:1, {s.weighted_requests} requests each of {2 * s.weighted_steps} tokens, "
                f"{s.weighted_steps} steps under `fair`: tokens served (prompt + output) A/B = **{served:.2f}** "
                f"(target 2 within 10%: {'met' if abs(served / 2 - 1) <= 0.1 else 'MISSED'}), output tokens "
                f"A/B = {output:.2f}; at the last step A held {slots} of the {s.seqs} slots; preemptions "
                f"(swap / recompute) {preemptions(r.engine)}.")
    return (f"### 1. Fairness: tenant A queues {s.tenant_a} requests, then tenant B {s.tenant_b}, at once\n\n"
            f"{s.fair_tokens} output tokens each (EOS ignored), max_num_seqs {s.seqs}. B's mean completion "
            f"time from submission; each run stops when B's requests are done. Under `fcfs` B's own steps come "
            f"last and run at batch {s.tenant_b}, cheaper than shared full batches, so its ratios in seconds sit "
            f"above those in steps.\n\n"
            + markdown_table(["policy", "B completion (s)", "B completion (steps)", "vs fcfs (s)",
                              "vs fcfs (steps)", "preemptions swap / recompute"], rows)
            + f"\n\nB under `fair` relative to `fcfs`: **{fair_ratio:.2f}** (target <= 0.35: "
              f"{'met' if fair_ratio <= 0.35 else 'MISSED'}).\n\n" + weighted)


# -- 2. priority ------------------------------------------------------------------------
def priority(s: Sizes) -> str:
    chats, _ = workload(s.seqs + 1)
    runs = [Clocked(p, make_engine(s.seqs, p)) for p in POLICIES]
    low = {r.name: [r.add(c, greedy(s.priority_tokens), priority=1) for c in chats[:s.seqs]] for r in runs}
    take_turns(runs, lambda r: all(i in r.first for i in low[r.name]))
    for _ in range(2):   # a couple of plain decode steps of the full batch
        for r in runs:
            r.step()
    high = {r.name: r.add(chats[-1], greedy(4), priority=0) for r in runs}
    take_turns(runs, lambda r: high[r.name] in r.first)
    ttft = {r.name: r.since_added(r.first, [high[r.name]]) for r in runs}
    rows = [[r.name, f"{ttft[r.name][0]:.0f}", f"{ttft[r.name][1]:.2f}", preemptions(r.engine)] for r in runs]
    steps = ttft["priority"][0]
    return (f"### 2. Priority: a high-priority request arrives while {s.seqs} long ones fill the batch\n\n"
            f"{s.seqs} requests of priority 1 and {s.priority_tokens} tokens, all decoding; then one of "
            f"priority 0 (same tenant). Its time to first token, counted in steps of the running batch "
            f"from its arrival.\n\n"
            + markdown_table(["policy", "TTFT (steps)", "TTFT (s)", "preemptions swap / recompute"], rows)
            + f"\n\nUnder `priority`: **{steps:.0f} steps** (target <= 3: {'met' if steps <= 3 else 'MISSED'}).")


# -- 3. context switch ------------------------------------------------------------------
def context_switch(s: Sizes) -> str:
    e = make_engine(s.seqs, enable_prefix_caching=False, max_num_batched_tokens=max(s.contexts))
    runner, swap = e.runner, e.kernel.switcher.swap
    rng = random.Random(0)
    rows, ratios = [], {}
    for n in s.contexts:
        outs, ins, prefills = [], [], []
        for rep in range(s.reps + 1):   # repetition 0 warms up this size and checks the round trip
            seq = e.add_request([rng.randrange(e.model_config.vocab_size) for _ in range(n)], greedy(2))
            t = time.perf_counter()
            e.step()
            prefill = time.perf_counter() - t
            assert seq.num_computed_tokens == n and len(seq.block_table) * e.config.block_size >= n
            before = runner.read_blocks(seq.block_table) if rep == 0 else None
            t0 = time.perf_counter()
            swap.put(seq.request_id, runner.read_blocks(seq.block_table))
            t1 = time.perf_counter()
            runner.write_blocks(seq.block_table, swap.take(seq.request_id))
            t2 = time.perf_counter()
            if rep == 0:
                assert torch.equal(before, runner.read_blocks(seq.block_table)), "swap round trip changed the KV"
            else:
                outs.append(t1 - t0)
                ins.append(t2 - t1)
                prefills.append(prefill)
            nbytes = len(seq.block_table) * e.kernel.bytes_per_block
            e.abort_request(seq.request_id)
            e.collect_deltas()
        out, inn, pre = map(statistics.median, (outs, ins, prefills))
        ratios[n] = (out + inn) / pre
        rows.append([n, f"{nbytes / MiB:.1f}", f"{out * 1e3:.1f}", f"{inn * 1e3:.1f}", f"{pre * 1e3:.0f}",
                     f"{ratios[n]:.3f}", f"{2 * nbytes / (out + inn) / 1e9:.1f}"])
    key = 1024 if 1024 in ratios else s.contexts[-1]
    return (f"### 3. Context switch: swap out + swap in against recompute\n\n"
            f"A sequence that holds n tokens of KV (one prefill step of n random tokens, prefix cache off). "
            f"Swap = the runner's read_blocks + SwapSpace.put, then take + write_blocks back (checked exact); "
            f"recompute = the prefill step of the same n tokens. Medians of {s.reps} repetitions.\n\n"
            + markdown_table(["context tokens", "KV MiB", "swap-out ms", "swap-in ms", "recompute ms",
                              "(out + in) / recompute", "copy GB/s"], rows)
            + f"\n\nAt {key} tokens: **{ratios[key]:.3f}** (target <= 0.05: "
              f"{'met' if ratios[key] <= 0.05 else 'MISSED'}).")


# -- 4. memory pressure -----------------------------------------------------------------
def outputs(reqs: list) -> dict:
    """Each request's tokens and, at each token, the margin between its top two logprobs."""
    return {"tokens": [list(q.output_token_ids) for q in reqs],
            "margins": [[lp.top_logprobs[0][2] - lp.top_logprobs[1][2] for lp in q.logprobs] for q in reqs]}


def divergence(ref: dict, other: dict) -> tuple[int, int, float]:
    """Requests whose tokens differ, tokens that differ, and the widest top-2 margin (in the
    reference) at a request's first difference: a near-tie when small."""
    n_req = n_tok = 0
    gap = 0.0
    for a, b, margins in zip(ref["tokens"], other["tokens"], ref["margins"]):
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        if diff:
            n_req += 1
            n_tok += len(diff)
            gap = max(gap, margins[diff[0]])
    return n_req, n_tok, gap


def drain(seqs: int, prompts: list, params: SamplingParams, settings: dict) -> dict:
    """All prompts submitted at once and stepped to the end. Peak RSS is taken while serving:
    the window opens after start-up, so it holds the weights, the pool and the swap tier."""
    e = make_engine(seqs, **settings)
    reset_peak_rss()
    reqs = [e.add_request(p, params) for p in prompts]
    steps, t, cpu = 0, time.perf_counter(), time.process_time()
    while e.has_unfinished():
        e.step()
        steps += 1
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    st = e.kernel.stats().to_dict()
    return {**outputs(reqs), "seconds": seconds, "cpu": cpu, "steps": steps, "rss": peak_rss(),
            "preemptions": st["preemptions"], "swap_ins": st["swap"]["swap_ins"],
            "swap_host_bytes": st["swap"]["host_bytes"], "blocks": e.block_manager.num_blocks,
            "bytes_per_block": e.kernel.bytes_per_block, "longest": max(len(q) for q in reqs),
            "errors": sum(q.finish_reason != "length" or len(q.output_token_ids) != params.max_tokens for q in reqs)}


def drain_alone(*args) -> dict:
    """drain in a process of its own: memory freed by earlier engines stays in this one's
    allocator and would hide each run's peak. (Not ru_maxrss: Linux carries it across fork
    and exec, so a child reports its parent's peak.)"""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(drain, *args).result()


def pressure(s: Sizes) -> str:
    chats, _ = workload(s.pressure_requests)
    params = greedy(s.pressure_tokens, logprobs=2)
    ref = drain_alone(s.seqs, chats, params, {})
    hold = max(2, s.pressure_requests // 16)
    kv = hold * -(-ref["longest"] // 16) * ref["bytes_per_block"]
    runs = {"unpressured (1 GiB pool)": ref}
    for mode in ("auto", "swap", "recompute"):
        runs[mode] = drain_alone(s.seqs, chats, params, {"kv_cache_memory": kv, "preemption_mode": mode})
    tokens = s.pressure_requests * s.pressure_tokens
    rows = []
    for name, r in runs.items():
        n_req, n_tok, gap = divergence(ref, r)
        p = r["preemptions"]
        rows.append([name, r["blocks"], r["errors"], f"{n_req} ({n_tok} tokens)", f"{gap:.4f}" if n_req else "-",
                     f"{r['rss'] / MiB:.0f}", f"{p['swap']} / {p['recompute']}",
                     r["swap_ins"], r["steps"], f"{tokens / r['seconds']:.1f}", f"{ref['seconds'] / r['seconds']:.2f}",
                     f"{ref['cpu'] / r['cpu']:.2f}"])
    return (f"### 4. Memory pressure: {s.pressure_requests} requests through a pool that holds {hold} of them\n\n"
            f"{s.pressure_requests} chat requests, {s.pressure_tokens} greedy tokens each (EOS ignored), all at once; "
            f"the pressured pool is {hold} x the longest request ({ref['longest']} tokens) = {kv / MiB:.1f} MiB. "
            f"Outputs are compared with the unpressured run; the margin is the widest top-1 - top-2 logprob "
            f"gap, in the unpressured run, at a request's first differing token. Peak RSS: VmHWM of a fresh "
            f"process per run, from the end of start-up (weights, pool, swap tier; ru_maxrss would carry the "
            f"parent's peak into the child). "
            f"Runs go one after the other, so the wall-clock throughput ratio carries the machine's drift; "
            f"the ratio of CPU-seconds spent (this process's threads only) and the step counts do not.\n\n"
            + markdown_table(["run", "pool blocks", "errors", "requests differing", "margin at difference",
                              "peak RSS MiB", "preemptions swap / recompute", "swap-ins",
                              "steps", "tok/s", "vs unpressured", "vs unpressured (CPU s)"], rows))


# -- 5. throughput ----------------------------------------------------------------------
def throughput(s: Sizes) -> str:
    chats, lengths = workload(s.throughput_requests)
    lengths = [min(n, s.throughput_cap) for n in lengths]
    runs = [Clocked(p, make_engine(s.seqs, p)) for p in ("fcfs", "fair")]
    for r in runs:
        for c, n in zip(chats, lengths):
            r.add(c, greedy(n))
    take_turns(runs, lambda r: not r.engine.has_unfinished())
    tps = {r.name: sum(lengths) / r.seconds for r in runs}
    rows = [[r.name, f"{r.seconds:.1f}", r.steps, f"{tps[r.name]:.1f}"] for r in runs]
    ratio = tps["fair"] / tps["fcfs"]
    return (f"### 5. Throughput: {len(chats)} chat requests, output {min(lengths)}..{max(lengths)} tokens, "
            f"max_num_seqs {s.seqs}\n\n"
            f"The throughput benchmark's workload (EOS ignored, all at once), one tenant.\n\n"
            + markdown_table(["policy", "seconds", "steps", "output tok/s"], rows)
            + f"\n\n`fair` / `fcfs` = **{ratio:.3f}** (target within 5%: {'met' if abs(ratio - 1) <= 0.05 else 'MISSED'}).")


# -- 6. compression ---------------------------------------------------------------------
def compression(s: Sizes) -> str:
    chats, _ = workload(s.compress_prompts)
    params = greedy(s.compress_tokens, logprobs=2)

    def run(preempt: bool, **settings) -> tuple[list, dict]:
        e = make_engine(s.seqs, preemption_mode="swap", **settings)
        reqs = [e.add_request(c, params) for c in chats]
        while min(len(q.output_token_ids) for q in reqs) < s.compress_tokens // 2:
            e.step()
        if preempt:
            for q in list(e.scheduler.running):
                e.scheduler.preempt(q)
        while e.has_unfinished():
            e.step()
        st = e.kernel.stats().to_dict()
        return reqs, st

    ref, _ = run(False)
    plain, plain_st = run(True)
    raw = plain_st["swap"]["bytes_out"]
    packed, st = run(True, swap_space=raw // 2)
    ref, plain, packed = map(outputs, (ref, plain, packed))
    sw = st["swap"]
    lossless, _, _ = divergence(ref, plain)
    n_req, n_tok, gap = divergence(plain, packed)
    total = s.compress_prompts * s.compress_tokens
    return (f"### 6. KV compression of swapped blocks\n\n"
            f"{s.compress_prompts} chat prompts, {s.compress_tokens} greedy tokens, every sequence swapped out "
            f"after {s.compress_tokens // 2} tokens and back in. Swap budget {raw // 2 / MiB:.1f} MiB, half of "
            f"the {raw / MiB:.1f} MiB swapped out, so past the 80% watermark the coldest entries go to int8.\n\n"
            + markdown_table(["entries compressed", "bytes saved MiB", "saved / swapped", "requests differing",
                              "output tokens differing", "margin at difference", "disk bytes"],
                             [[f"{sw['compressed_entries']} of {s.compress_prompts}",
                               f"{sw['bytes_saved_by_compression'] / MiB:.1f}",
                               f"{sw['bytes_saved_by_compression'] / raw:.0%}", n_req, f"{n_tok} of {total}",
                               f"{gap:.4f}" if n_req else "-", sw["disk_bytes"]]])
            + f"\n\nCompared with the same run with a large (uncompressed) swap budget; the margin is the widest "
              f"top-1 - top-2 logprob gap, in that run, at a request's first differing token. The uncompressed run "
              f"matches a run without preemption in {s.compress_prompts - lossless} of {s.compress_prompts} "
              f"requests.")


PARTS = {1: fairness, 2: priority, 3: context_switch, 4: pressure, 5: throughput, 6: compression}


def write_results(command: str, body: str) -> None:
    """Replaces the Scheduling section of the results file (whatever its date) where it
    stands, or appends it, leaving the other sections, which other benchmarks own, as they are."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    parts = re.split(r"(?m)^(?=## )", text)
    mine = [i for i, p in enumerate(parts) if p.startswith("## Scheduling")]
    at = mine[0] if mine else len(parts)
    parts = [p for i, p in enumerate(parts) if i not in mine]
    section = f"## Scheduling ({datetime.date.today().isoformat()})\n\n```\n{command}\n```\n\n{body.strip()}\n\n"
    parts[at - 1] = parts[at - 1].rstrip("\n") + "\n\n"
    parts.insert(at, section)
    RESULTS.write_text("".join(parts).rstrip("\n") + "\n")


def own_cpu_seconds() -> float:
    """CPU-seconds of this process and of its finished children (part 4's runs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    ap.add_argument("--only", type=int, choices=sorted(PARTS), help="run one part")
    ap.add_argument("--write", action="store_true",
                    help="replace the Scheduling section of docs/benchmarks.md with this run's results")
    args = ap.parse_args()
    sizes = QUICK if args.quick else Sizes()
    busy0, own0, t0 = cpu_seconds()[0], own_cpu_seconds(), time.perf_counter()
    blocks = []
    for n in [args.only] if args.only else PARTS:
        block = PARTS[n](sizes)
        gc.collect()   # the part's engines, before the next part loads its own
        print(block + "\n", flush=True)
        blocks.append(block)
    busy1, own1 = cpu_seconds()[0], own_cpu_seconds()
    wall = time.perf_counter() - t0
    others = (busy1 - busy0 - (own1 - own0)) / wall
    blocks.append(f"{wall / 60:.1f} minutes; {torch.get_num_threads()} threads, torch {torch.__version__}, "
                  f"model {MODEL}. Other processes kept {others:.2f} of the {os.cpu_count()} cores busy "
                  f"while it ran.")
    print(blocks[-1])
    if args.write:
        exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else "python"
        write_results(" ".join([exe] + sys.argv), "\n\n".join(blocks))


if __name__ == "__main__":
    main()
