"""Multi-LoRA serving: a batch of 64 requests through 0, 1, 4 and 16 distinct adapters.

batch:  64 chat requests (the throughput benchmark's prompts), --max-tokens output tokens
        each (EOS ignored), all submitted at once; request i uses adapter i mod k. Adapters
        have rank 8 or 16 on q, k, v, o, gate, up and down (random weights, PEFT format).
        The prefix cache is off, so every run computes the same prompts afresh.
load:   time to load one adapter (read, check, lay out for the engine, register), from
        a PEFT directory and from a GGUF LoRA file.

Each configuration runs --rounds times, interleaved (A B C ... A B C ...), and each is
reported as its output tokens/s divided by that of the no-adapter run of the same round
(median over rounds): absolute speeds drift with the load others put on a shared CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import cpu_seconds, markdown_table, write_section  # noqa: E402
from benchmarks.throughput import workload  # noqa: E402

from llmos import LLM, SamplingParams  # noqa: E402
from llmos.models.lora_loader import TARGETS, target_shape  # noqa: E402

MODEL = "smollm2-135m"
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def random_adapter(root: Path, name: str, cfg, rank: int, seed: int) -> Path:
    """A PEFT-format adapter with random weights on every target module."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for t in TARGETS:
            out, inp = target_shape(cfg, t)
            p = f"base_model.model.model.layers.{layer}.{_PARENT[t]}.{t}."
            tensors[p + "lora_A.weight"] = torch.randn(rank, inp, generator=g) / inp ** 0.5
            tensors[p + "lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.01
    d = root / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                       "target_modules": list(TARGETS)}))
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def gguf_adapter(peft_dir: Path, out: Path, rank: int) -> Path:
    """An adapter as a GGUF LoRA file, under llama.cpp's tensor names (only its load is timed)."""
    import gguf
    from safetensors import safe_open
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 2.0 * rank)
    with safe_open(str(peft_dir / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            parts = key.split(".")
            w.add_tensor(f"blk.{parts[4]}.{_GGUF[parts[6]]}.weight.lora_{parts[7][-1].lower()}",
                         f.get_tensor(key).numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def run_batch(llm: LLM, chats, adapters: list[str], max_tokens: int) -> tuple[float, float]:
    """(seconds for the whole batch, seconds per decode step once every request decodes),
    request i through adapters[i % k] (none if empty)."""
    names = [adapters[i % len(adapters)] if adapters else None for i in range(len(chats))]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.chat(chats, params, adapter=names)
    seconds = time.perf_counter() - t
    assert all(len(o.token_ids) == max_tokens for o in outs)
    decoding = max(o.metrics.first_token_time for o in outs)
    step = (max(o.metrics.last_token_time for o in outs) - decoding) / (max_tokens - 1)
    return seconds, step


def kernels(llm: LLM, names: list[str], counts: list[int], rows: int, rounds: int) -> str:
    """Milliseconds per decode step of the LoRA products alone (every layer's qkv, o,
    gate_up and down; `rows` rows, request i through adapter i mod k), four ways: stacked
    weights kept between steps with one B per target (what the engine does); the same
    with one block-diagonal B per projection (one expand instead of one per target);
    stacked afresh every step; a loop of small matmuls per adapter group. The base GEMMs
    of the same step are timed alongside for scale."""
    import torch.nn.functional as F
    from llmos.engine.lora import PROJECTIONS
    runner, bank = llm.engine.runner, llm.engine.runner.lora
    layers = runner.model.layers
    x = {p: torch.randn(rows, layers[0][p].shape[1]) for p in PROJECTIONS}
    out = {p: torch.zeros(rows, layers[0][p].shape[0]) for p in PROJECTIONS}

    def base() -> None:
        for layer in layers:
            for p in PROJECTIONS:
                F.linear(x[p], layer[p])

    def batched(plan) -> None:
        for i in range(len(layers)):
            for p in PROJECTIONS:
                plan.add(i, p, x[p], out[p])

    def block_diagonal(plan) -> dict:
        """Each stacked projection's B's as one [G, w, out] block-diagonal matrix."""
        bd = {}
        for i, layer in enumerate(plan.layers):
            for p, w in layer.items():
                b = w.a.new_zeros(w.a.shape[0], w.a.shape[2], out[p].shape[1])
                for col, c0, bt in w.blocks:
                    b[:, col:col + bt.shape[1], c0:c0 + bt.shape[2]] = bt
                bd[i, p] = (w.a, b)
        return bd

    def batched_bd(plan, bd) -> None:
        g, m = plan.shape
        for i in range(len(layers)):
            for p in PROJECTIONS:
                a, b = bd[i, p]
                s = torch.bmm(x[p].index_select(0, plan.idx).view(g, m, -1), a)
                out[p].index_add_(0, plan.idx, torch.bmm(s, b).view(g * m, -1))

    def fresh(runs) -> None:
        bank._stack_key = None
        batched(bank.plan(runs, runner.device))

    def loop(groups: dict[str, list[int]]) -> None:
        order = torch.tensor([r for g in groups.values() for r in g])
        for i in range(len(layers)):
            for p in PROJECTIONS:
                xs = x[p].index_select(0, order)
                ys = torch.zeros(rows, out[p].shape[1])
                s = 0
                for name, g in groups.items():
                    w = bank.adapters[name].layers[i][p]
                    sg = xs[s:s + len(g)] @ w.a
                    for col, c0, b in w.blocks:
                        ys[s:s + len(g), c0:c0 + b.shape[1]] = sg[:, col:col + b.shape[0]] @ b
                    s += len(g)
                out[p].index_add_(0, order, ys)

    table = []
    for k in [c for c in counts if c > 1]:
        runs = [(names[i % k], 1) for i in range(rows)]
        groups = {n: [i for i in range(rows) if i % k == j] for j, n in enumerate(names[:k])}
        bank._stack_key = None
        plan = bank.plan(runs, runner.device)
        bd = block_diagonal(plan)
        fns = {"base": base, "kept": lambda: batched(plan), "bd": lambda: batched_bd(plan, bd),
               "fresh": lambda: fresh(runs), "loop": lambda: loop(groups)}
        times: dict[str, list[float]] = {n: [] for n in fns}
        for _ in range(rounds):
            for n, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[n].append(time.perf_counter() - t)
        ms = {n: statistics.median(v) * 1000 for n, v in times.items()}
        table.append([k, f"{ms['base']:.1f}"] + [f"{ms[n]:.1f} ({ms[n] / ms['kept']:.1f}x)"
                                                  for n in ("kept", "bd", "fresh", "loop")])
    return markdown_table(["adapters", "base GEMMs, ms", "LoRA: stacked, kept, B per target",
                           "... one block-diagonal B", "... stacked every step", "loop per group"], table)


def decode_steps(llm: LLM, chats, names: dict[int, list[str]], counts: list[int], rounds: int) -> str:
    """Milliseconds per forward pass of one decode step of the whole batch, the same 64
    sequences each time with their rows assigned to 0, 1, 4 or 16 adapters, the
    configurations interleaved step by step (the engine is held, so nothing else runs).
    Each timed step follows an untimed one of the same configuration: the steady state of
    a batch whose set of adapters does not change."""
    from llmos.kernel.request import ScheduledSeq

    def measure(engine) -> dict[str, list[float]]:
        seqs = [engine.add_request(c, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
                for c in chats]
        while any(s.num_computed_tokens < s.num_prompt_tokens for s in seqs):
            engine.step()
        for s in seqs:
            engine.block_manager.append_slots(s, 1)
        batch = [ScheduledSeq(s, 1) for s in seqs]
        configs = {"none": [None]} | {f"rank {r}, {k}": names[r][:k] for r in names for k in counts}
        times: dict[str, list[float]] = {c: [] for c in configs}
        for _ in range(rounds):
            for label, adapters in configs.items():
                for i, s in enumerate(seqs):
                    s.adapter = adapters[i % len(adapters)]
                engine.runner.execute(batch)         # untimed: stacks this set's weights, as a batch's first step does
                t = time.perf_counter()
                engine.runner.execute(batch)
                times[label].append(time.perf_counter() - t)
        for s in seqs:
            s.adapter = None
            engine.abort_request(s.request_id)
        return times

    times = llm.loop.call(measure)
    none = statistics.median(times["none"])
    rows = [[label, f"{statistics.median(v) * 1000:.0f}", f"{none / statistics.median(v):.2f}"]
            for label, v in times.items()]
    return markdown_table(["adapters in the batch", "decode step, ms (median)", "vs none"], rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="add the results to docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    chats, _ = workload(args.requests)
    most = max(args.adapters)
    with tempfile.TemporaryDirectory() as tmp, \
            LLM(model=MODEL, kv_cache_memory="512MiB", max_num_seqs=args.requests, enable_prefix_caching=False,
                max_loaded_adapters=most * len(args.ranks) + 1, adapter_memory="4GiB", num_threads=args.threads) as llm:
        names, sizes, loads = load_adapters(llm, Path(tmp), args.ranks, most)
        run_batch(llm, chats[:8], [], 4)                           # warm-up
        configs = [("none", 0, [])] + [(f"rank {r}, {k} adapter{'s' if k > 1 else ''}", r, names[r][:k])
                                       for r in args.ranks for k in args.adapters]
        times: dict[str, list[tuple[float, float]]] = {c[0]: [] for c in configs}
        busy0, own0, t0 = *cpu_seconds(), time.perf_counter()
        for rnd in range(args.rounds):
            for label, _, adapters in configs:
                times[label].append(run_batch(llm, chats, adapters, args.max_tokens))
                print(f"round {rnd + 1} {label:<22} {times[label][-1][0]:6.2f} s, "
                      f"decode step {times[label][-1][1] * 1000:5.0f} ms", flush=True)
        wall = time.perf_counter() - t0
        busy1, own1 = cpu_seconds()
        top = max(args.ranks)
        step_table = decode_steps(llm, chats, names, args.adapters, 3 * args.rounds + 3)
        kernel_table = kernels(llm, names[top], args.adapters, args.requests, 15)
    body = report(args, configs, times, sizes, loads, step_table, kernel_table, top,
                  ((busy1 - busy0) - (own1 - own0)) / wall, wall)
    print(body)
    if args.write:
        write_section("LoRA adapters", "python benchmarks/lora.py --write", body)
    return 0


def load_adapters(llm: LLM, root: Path, ranks: list[int], most: int):
    """`most` random adapters per rank, loaded from PEFT directories (timed), and a GGUF
    file per rank loaded and unloaded three times (timed)."""
    cfg = llm.engine.model_config
    loads: dict[str, list[float]] = {}
    names: dict[int, list[str]] = {}
    sizes: dict[int, int] = {}
    for rank in ranks:
        names[rank] = []
        for i in range(most):
            path = random_adapter(root, f"r{rank}-{i}", cfg, rank, seed=1000 * rank + i)
            t = time.perf_counter()
            info = llm.load_adapter(f"r{rank}-{i}", str(path))
            loads.setdefault(f"PEFT, rank {rank}", []).append(time.perf_counter() - t)
            names[rank].append(info.name)
            sizes[rank] = info.bytes
        gg = gguf_adapter(root / f"r{rank}-0", root / f"r{rank}.gguf", rank)
        for j in range(3):
            t = time.perf_counter()
            llm.load_adapter(f"g{rank}-{j}", str(gg))
            loads.setdefault(f"GGUF, rank {rank}", []).append(time.perf_counter() - t)
            llm.unload_adapter(f"g{rank}-{j}")
    return names, sizes, loads


def report(args, configs, times, sizes, loads, step_table: str, kernel_table: str, top: int, other_cores: float,
           wall: float) -> str:
    tokens = args.requests * args.max_tokens
    rows = []
    for label, rank, _ in configs:
        whole = [b[0] / t[0] for b, t in zip(times["none"], times[label])]
        step = [b[1] / t[1] for b, t in zip(times["none"], times[label])]
        rows.append([label, f"{tokens / statistics.median(t[0] for t in times[label]):.0f}",
                     f"{statistics.median(whole):.2f} ({min(whole):.2f}-{max(whole):.2f})",
                     f"{statistics.median(t[1] for t in times[label]) * 1000:.0f}",
                     f"{statistics.median(step):.2f} ({min(step):.2f}-{max(step):.2f})",
                     f"{sizes[rank] / 2**20:.1f}" if rank else "-"])
    table = markdown_table(["adapters in the batch", "output tokens/s", "vs none: whole batch",
                            "decode step, ms", "vs none: decode step", "MiB per adapter"], rows)
    load_table = markdown_table(["adapter file", "load time, ms (median)", "loads"],
                                [[k, f"{statistics.median(v) * 1000:.0f}", len(v)] for k, v in loads.items()])
    return (f"### batch: {args.requests} chat requests, {args.max_tokens} output tokens each (EOS ignored), "
            f"max_num_seqs {args.requests}, prefix cache off, {args.threads} threads, {args.rounds} rounds "
            f"interleaved\n\n{table}\n\n"
            "Request i runs through adapter i mod k; LoRA on q, k, v, o, gate, up and down. Ratios are the "
            "no-adapter time over the configuration's time in the same round: median (min-max) over rounds. "
            "\"decode step\" is the time per step once all 64 requests decode (prefill excluded).\n\n"
            f"### one decode step of {args.requests} sequences, configurations interleaved step by step "
            f"({3 * args.rounds + 3} timed steps each, each after an untimed one)\n\n{step_table}\n\n"
            f"### the LoRA products alone, rank {top}, {args.requests} decode rows (medians of 15, interleaved)\n\n"
            f"{kernel_table}\n\n"
            f"### adapter load time (read, check, lay out, register)\n\n{load_table}\n\n"
            f"Other processes used {other_cores:.2f} cores on average during the timed rounds ({wall:.0f} s).\n")


if __name__ == "__main__":
    sys.exit(main())
