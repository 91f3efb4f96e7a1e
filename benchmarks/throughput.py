"""Engine throughput: llmos (packed weights by default, int8 activations, float32 weights)
against llama.cpp (llama-cpp-python, on the same GGUF file) and Hugging Face transformers.

single:  one request, 256 new tokens: single-stream decode speed, bounded by how fast the
         weights stream from memory.
batch:   N chat requests (default 64), output lengths 16..256 drawn with a fixed seed, EOS
         ignored, all at once.
prefill: one 1,024-token prompt, time to its first token.

Every measurement is one system in a fresh process (benchmarks/peers.py) with its own
default settings, the systems interleaved round by round (A B C A B C ...), medians
quoted: this machine's speed drifts by 2x between runs. Needs llama-cpp-python in the
environment (`make bench-deps`); llmos never depends on it. --profile instead runs the
llmos batch workload under cProfile and splits its time into GEMMs, attention, sampler
and Python around them.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SET_HERE = {k for k in ("OMP_WAIT_POLICY",) if k not in os.environ}   # what this process adds, kept from peers

# Idle OpenMP threads sleep instead of spinning. On a CPU shared with other jobs a spinning
# worker holds a core the other threads need: measured here, one decode step at 2 threads
# took 250 ms with spinning (libgomp's default) and 60 ms without, for both systems alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# Runs from a checkout as `python benchmarks/throughput.py`, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import MachinePeak, cpu_seconds, markdown_table, write_section  # noqa: E402

from llmos import SamplingParams  # noqa: E402
from llmos.models.loader import load_model  # noqa: E402

MODEL = "smollm2-135m"
TOPICS = ["photosynthesis", "the French Revolution", "black holes", "compound interest", "the immune system",
          "plate tectonics", "how vaccines work", "the water cycle", "machine learning", "the Roman Empire",
          "climate change", "prime numbers", "the human heart", "renewable energy", "how airplanes fly",
          "the printing press"]
FORMS = ["What is {}?", "Explain {} to a ten-year-old.", "Why does {} matter?", "Give me three facts about {}.",
         "What are common misconceptions about {}?", "How would you teach {} in one lesson?",
         "Summarize the history of {}.", "Write a short poem about {}."]
SINGLE = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and a storm."}]
WARMUP = [{"role": "user", "content": "Hi!"}]


def workload(n: int) -> tuple[list[list[dict]], list[int]]:
    """n single-turn chats (distinct for n <= 128) and their output lengths, the same every run."""
    combos = [form.format(topic) for topic in TOPICS for form in FORMS]
    chats = [[{"role": "user", "content": combos[(i * 37) % len(combos)]}] for i in range(n)]
    rng = random.Random(0)
    return chats, [rng.randint(16, 256) for _ in range(n)]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def profile_llmos(args, chats, lengths) -> str:
    """cProfile of llmos' batch workload, grouped by where the time goes. The engine is
    stepped on this thread, without the LLM's loop thread, so cProfile sees every step.
    Ops called as Tensor operators (x * y, x + y) are invisible to cProfile and land in
    their caller's own time."""
    from llmos.config import EngineConfig
    from llmos.engine.llm_engine import LLMEngine
    engine = LLMEngine(EngineConfig(model=MODEL, kv_cache_memory=args.kv_cache_memory,
                                    max_num_seqs=args.max_num_seqs, num_threads=args.threads,
                                    packed_activations=args.activations))

    def drive(convs, params):
        seqs = [engine.add_request(c, p) for c, p in zip(convs, params)]
        while engine.has_unfinished():
            engine.step()
        return [s.output() for s in seqs]

    drive([WARMUP], [greedy(8)])
    peak = MachinePeak()
    peak.sample()
    steps0 = engine.num_steps
    prof = cProfile.Profile()
    busy0, own0, t = *cpu_seconds(), time.perf_counter()
    prof.enable()
    outs = drive(chats, [greedy(n) for n in lengths])
    prof.disable()
    wall = time.perf_counter() - t
    busy1, own1 = cpu_seconds()
    peak.sample()
    stats = pstats.Stats(prof).stats   # (file, line, name) -> (calls, ncalls, tottime, cumtime, callers)

    def cum(name: str) -> float:
        return sum(v[3] for (f, _, n), v in stats.items() if n == name and "llmos" in f)

    def own(name: str) -> float:
        return sum(v[2] for (_, _, n), v in stats.items() if name in n)

    linear, kv_write = own("torch._C._nn.linear") + own("llmos_packed.gemm"), own("'index_copy_'")
    forward, attention, decode_attn = cum("forward"), cum("_attention"), cum("paged_decode_attention")
    stack, dequant = own("llmos_packed.forward"), own("llmos_packed.dequantize")
    packed_mm = own("llmos_packed.matmul")      # and llmos_packed.matmul_panels (int8 on VNNI)
    forward -= stack
    parts = [
        ("decode stack (packed; every layer of a decode step in one C++ call)", stack),
        ("packed matmuls outside the stack (lm_head, prefill layers; VNNI panels under int8)", packed_mm),
        ("dequantizing 8 MiB tiles for float32 GEMMs (long prompts)", dequant),
        ("GEMMs (F.linear; L2-tile GEMMs of packed weights; incl. lm_head)", linear),
        ("decode attention (paged kernel)", decode_attn),
        ("prefill attention (gather + SDPA)", attention - decode_attn),
        ("KV cache writes (index_copy_)", kv_write),
        ("norms, RoPE, SiLU, residuals, op dispatch", forward - linear - attention - kv_write - packed_mm - dequant),
        ("batch to tensors, logits to CPU", cum("execute") - forward - stack),
        ("sampler", cum("sample")),
        ("scheduler + block manager", cum("schedule") + cum("register_full_blocks")),
        ("append token, detokenize, stop checks", cum("_append_token")),
    ]
    parts.append(("rest (chat template, tenants, engine step glue)", wall - sum(s for _, s in parts)))
    # Every computed token goes through the layers; only sampled ones through the lm_head.
    cfg = engine.model_config
    head = cfg.vocab_size * cfg.hidden_size
    computed = sum(len(o.prompt_token_ids) - o.metrics.num_cached_tokens for o in outs) + sum(lengths)
    gemm_s = 2 * ((cfg.num_parameters - head) * computed + head * sum(lengths)) / peak.flops
    steps = engine.num_steps - steps0
    table = markdown_table(["where", "seconds", "share"], [[n, f"{s:.2f}", f"{s / wall:.1%}"] for n, s in parts])
    return (f"{table}\n\n{len(chats)} requests, {steps} engine steps ({sum(lengths) / steps:.1f} output tokens "
            f"per step), {wall:.1f} s under cProfile. At the probed {peak.flops / 1e9:.0f} GFLOP/s this run's "
            f"GEMM FLOPs ({computed} computed tokens) take {gemm_s:.1f} s; the whole run reached "
            f"{gemm_s / wall:.2f} of the probe (MFU). Other processes kept "
            f"{(busy1 - busy0 - (own1 - own0)) / wall:.2f} of the {os.cpu_count()} cores busy meanwhile.")


SYSTEMS = {"single": ["llmos", "llmos-int8", "llmos-float32", "llama.cpp", "llama.cpp-2t"],
           "batch": ["llmos", "llmos-int8", "llmos-float32", "llama.cpp", "transformers"],
           "prefill": ["llmos", "llmos-int8", "llmos-float32", "llama.cpp"]}


def workload_file(args, chats, lengths, tmp: Path) -> Path:
    """Token ids every system computes: llmos' tokenization of the chats, a 1,024-token prompt."""
    from llmos.models.store import ModelStore
    loaded = load_model(MODEL)
    tok = loaded.tokenizer
    text = (Path(__file__).resolve().parent.parent / "tests" / "data" / "perplexity.txt").read_text()
    long = tok.encode(text)
    while len(long) < 1024:
        long += long
    w = {"model": MODEL, "gguf": str(ModelStore().resolve(MODEL)), "eos": tok.eos_token_ids,
         "warmup": tok.encode_chat(WARMUP)[1], "single": tok.encode_chat(SINGLE)[1],
         "single_tokens": args.single_tokens, "batch": [tok.encode_chat(c)[1] for c in chats],
         "lengths": lengths, "prefill": long[:1024]}
    path = tmp / "workload.json"
    path.write_text(json.dumps(w))
    return path


def run_peer(system: str, task: str, workload: Path) -> dict:
    """One measurement in a fresh process with the environment this shell gave us."""
    env = {k: v for k, v in os.environ.items() if k not in SET_HERE}
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("peers.py")), system, task, str(workload)],
                         capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{system} {task} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peers(args, chats, lengths) -> str:
    """Rounds of every system on every task, interleaved (A B A B ...); medians."""
    peak = MachinePeak()
    peak.sample()
    busy0, own0, t0 = *cpu_seconds(), time.perf_counter()
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workload = workload_file(args, chats, lengths, Path(tmp))
        for r in range(args.rounds):
            for task in args.tasks:
                for system in SYSTEMS[task]:
                    res = run_peer(system, task, workload)
                    runs.setdefault((task, system), []).append(res)
                    print(f"round {r + 1} {task:8} {system:14} "
                          + " ".join(f"{k}={v:.3f}" for k, v in res.items() if isinstance(v, float)), flush=True)
            peak.sample()
    busy1, own1 = cpu_seconds()
    others = (busy1 - busy0 - (own1 - own0)) / (time.perf_counter() - t0)
    return report(args, runs, peak, others)


def median(xs) -> float:
    return float(statistics.median(xs))


def report(args, runs: dict, peak: MachinePeak, others: float) -> str:
    blocks = []
    n = args.single_tokens
    if "single" in args.tasks:
        tps = {s: median([(n - 1) / r["decode_s"] for r in runs[("single", s)]]) for s in SYSTEMS["single"]}
        best_cpp = max(tps["llama.cpp"], tps["llama.cpp-2t"])
        ref = runs[("single", "llmos-float32")][0]["tokens"]
        rows = []
        for s in SYSTEMS["single"]:
            r = runs[("single", s)][0]
            wb = r.get("weight_bytes")
            same = next((i for i, (a, b) in enumerate(zip(r["tokens"], ref)) if a != b), n)
            rows.append([s, tps[s], tps[s] / best_cpp, f"{tps[s] * wb / peak.bandwidth:.2f}" if wb else "-",
                         f"{same}/{n}", median([x["peak_rss"] for x in runs[("single", s)]]) / 2**30])
        blocks.append(f"### single stream: {n} new tokens, greedy, EOS ignored ({args.rounds} rounds, medians)\n\n"
                      + markdown_table(["system", "decode tok/s", "vs best llama.cpp", "MBU (weight bytes)",
                                        "greedy tokens equal to llmos-float32's", "peak RSS GiB"], rows)
                      + "\n\nllama.cpp: llama-cpp-python's default threads (1 for one-token steps on 2 cores) "
                        "and 2 threads (-2t). MBU: weight bytes read per token (llmos: the matrices as held, "
                        "packed or float32; llmos-int8: their VNNI panels) times tok/s over the read bandwidth "
                        "probed in this run.")
    if "batch" in args.tasks:
        out_tok = sum(args.lengths)
        tps = {s: median([out_tok / r["seconds"] for r in runs[("batch", s)]]) for s in SYSTEMS["batch"]}
        rows = [[s, tps[s], tps[s] / tps["llama.cpp"], tps[s] / tps["transformers"],
                 median([r["cpu_s"] / r["seconds"] for r in runs[("batch", s)]]),
                 median([r["peak_rss"] for r in runs[("batch", s)]]) / 2**30] for s in SYSTEMS["batch"]]
        blocks.append(f"### batch: {len(args.lengths)} requests at once, output {min(args.lengths)}..{max(args.lengths)} "
                      f"tokens, greedy, EOS ignored\n\n"
                      + markdown_table(["system", "output tok/s", "vs llama.cpp", "vs transformers",
                                        "cores busy (CPU s / s)", "peak RSS GiB"], rows)
                      + "\n\nllama.cpp: every unfinished sequence's next token in one llama_batch per step "
                        "(llama-cpp-python's low-level API, its default threads); transformers: static batches "
                        "of 64, left-padded, each to its longest length (only requested tokens count).")
    if "prefill" in args.tasks:
        tps = {s: median([1024 / r["seconds"] for r in runs[("prefill", s)]]) for s in SYSTEMS["prefill"]}
        rows = [[s, tps[s], tps[s] / tps["llama.cpp"],
                 median([r["peak_rss"] for r in runs[("prefill", s)]]) / 2**30] for s in SYSTEMS["prefill"]]
        blocks.append("### prefill: one 1,024-token prompt, time to its first token\n\n"
                      + markdown_table(["system", "prompt tok/s", "vs llama.cpp", "peak RSS GiB"], rows))
    blocks.append(f"Machine, measured in this run: fp32 GEMM {peak.flops / 1e9:.0f} GFLOP/s, memory read "
                  f"{peak.bandwidth / 1e9:.1f} GB/s; {os.cpu_count()} cores, torch {torch.__version__}. "
                  f"Every number is one system alone in a fresh process, systems interleaved round by round. "
                  f"Other processes kept {others:.2f} of the cores busy while it ran.")
    return "\n\n".join(blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="single,batch,prefill", help="comma-separated: single, batch, prefill")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--kv-cache-memory", default="1GiB")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (--profile)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 requests, 64-token single stream, 1 round")
    ap.add_argument("--profile", action="store_true", help="only profile llmos' batch mode")
    ap.add_argument("--activations", default="float32", choices=("float32", "int8"),
                    help="--profile: the packed_activations setting profiled")
    ap.add_argument("--write", action="store_true", help="record the result in docs/benchmarks.md")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.rounds = min(args.requests, 8), 1
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.single_tokens = 64 if args.quick else 256
    torch.set_num_threads(args.threads)
    chats, args.lengths = workload(args.requests)
    text = profile_llmos(args, chats, args.lengths) if args.profile else peers(args, chats, args.lengths)
    print(text)
    if args.write:
        exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else "python"
        name = "throughput" + "".join(f" {flag}" for flag in ("--quick", "--profile") if getattr(args, flag[2:]))
        if args.profile and args.activations != "float32":
            name += f" --activations {args.activations}"
        write_section(name, " ".join([exe] + sys.argv), text)


if __name__ == "__main__":
    main()
