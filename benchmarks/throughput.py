"""Engine throughput: llmos against Hugging Face transformers `generate`, in one process.

batch:  N chat requests (default 64), output lengths 16..256 drawn with a fixed seed, EOS
        ignored, all submitted at once. transformers runs them as static batches of
        --max-num-seqs, left-padded, each batch to its longest requested length; only the
        tokens each request asked for count as its output.
single: one request, 256 new tokens: single-stream decode speed, bounded by how fast the
        weights stream from memory.

Speeds are reported as ratios to what this run measures on this machine (GEMM FLOP/s for
MFU, read bandwidth for MBU) and to transformers, because absolute numbers drift with the
load others put on a shared CPU. --profile instead runs the llmos batch workload under
cProfile and splits its time into GEMMs, attention, sampler and Python around them.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import random
import sys
import time

# Idle OpenMP threads sleep instead of spinning. On a CPU shared with other jobs a spinning
# worker holds a core the other threads need: measured here, one decode step at 2 threads
# took 250 ms with spinning (libgomp's default) and 60 ms without, for both systems alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# Runs from a checkout as `python benchmarks/throughput.py`, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (MachinePeak, cpu_seconds, markdown_table, peak_rss,  # noqa: E402
                               reset_peak_rss, write_section)

from llmos import LLM, SamplingParams  # noqa: E402
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


def transformers_model(loaded):
    """LlamaForCausalLM holding the very weights llmos runs, on transformers' fastest CPU attention."""
    from llmos.models.loader import to_transformers
    return to_transformers(loaded, attn_implementation="sdpa")


class TokenClock:
    """A generate streamer that only notes when each put arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int, eos_ids: list[int],
                streamer=None) -> torch.Tensor:
    """One static batch, left-padded, run to exactly new_tokens (EOS masked until then)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=pad_id, eos_token_id=eos_ids, streamer=streamer)
    assert out.shape[1] == width + new_tokens, "transformers stopped early"
    return out[:, width:]


def run_llmos(args, chats, lengths, peak: MachinePeak) -> dict:
    with LLM(model=MODEL, kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
             num_threads=args.threads, decode_dtype=args.decode_dtype) as llm:
        return measure_llmos(args, llm, chats, lengths, peak)


def measure_llmos(args, llm, chats, lengths, peak: MachinePeak) -> dict:
    warm = llm.chat(WARMUP, greedy(8))[0]
    res = {"warmup_prompt": warm.prompt_token_ids, "eos_ids": llm.get_tokenizer().eos_token_ids,
           "num_parameters": llm.engine.model_config.num_parameters,
           # Single-stream steps read the decode_dtype copy of the weights when one is set.
           "weight_bytes": llm.engine.model_config.num_parameters * torch.finfo(
               getattr(torch, args.decode_dtype) if args.decode_dtype else llm.engine.runner.dtype).bits // 8}
    if args.mode in ("batch", "all"):
        peak.sample(memory=False)
        t = time.perf_counter()
        outs = llm.chat(chats, [greedy(n) for n in lengths])
        res["batch_s"] = time.perf_counter() - t
        assert [len(o.token_ids) for o in outs] == lengths
        res["output_tokens"] = sum(lengths)
        res["prompt_tokens"] = sum(len(o.prompt_token_ids) for o in outs)
        res["computed_prompt_tokens"] = sum(len(o.prompt_token_ids) - o.metrics.num_cached_tokens for o in outs)
        res["prompts"] = [o.prompt_token_ids for o in outs]
    if args.mode in ("single", "all"):
        peak.sample(memory=False)
        t = time.perf_counter()
        out = llm.chat(SINGLE, greedy(args.single_tokens))[0]
        res["single_s"] = time.perf_counter() - t
        m = out.metrics
        res["single_decode_s"] = m.finished_time - m.first_token_time
        res["single_tokens"] = out.token_ids
        res["single_prompt"] = out.prompt_token_ids
    res["peak_rss"] = peak_rss()
    return res


def run_transformers(args, lengths, ref: dict, peak: MachinePeak) -> dict:
    """The same prompts, as llmos tokenized them, through transformers `generate`."""
    model = transformers_model(load_model(MODEL))
    eos_ids, prompts = ref["eos_ids"], ref.get("prompts")
    pad = eos_ids[0]
    hf_generate(model, [ref["warmup_prompt"]], 8, pad, eos_ids)
    res = {}
    if args.mode in ("batch", "all"):
        peak.sample(memory=False)
        t = time.perf_counter()
        for i in range(0, len(prompts), args.max_num_seqs):
            hf_generate(model, prompts[i:i + args.max_num_seqs], max(lengths[i:i + args.max_num_seqs]), pad, eos_ids)
        res["batch_s"] = time.perf_counter() - t
    if args.mode in ("single", "all"):
        peak.sample(memory=False)
        clock = TokenClock()
        t = time.perf_counter()
        out = hf_generate(model, [ref["single_prompt"]], args.single_tokens, pad, eos_ids, streamer=clock)
        res["single_s"] = time.perf_counter() - t
        res["single_decode_s"] = clock.times[-1] - clock.times[1]
        res["single_tokens"] = out[0].tolist()
    res["peak_rss"] = peak_rss()
    return res


def profile_llmos(args, chats, lengths) -> str:
    """cProfile of llmos' batch workload, grouped by where the time goes. The engine is
    stepped on this thread, without the LLM's loop thread, so cProfile sees every step.
    Ops called as Tensor operators (x * y, x + y) are invisible to cProfile and land in
    their caller's own time."""
    from llmos.config import EngineConfig
    from llmos.engine.llm_engine import LLMEngine
    engine = LLMEngine(EngineConfig(model=MODEL, kv_cache_memory=args.kv_cache_memory,
                                    max_num_seqs=args.max_num_seqs, num_threads=args.threads))

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

    linear, kv_write = own("torch._C._nn.linear"), own("'index_copy_'")
    forward, attention, decode_attn = cum("forward"), cum("_attention"), cum("paged_decode_attention")
    parts = [
        ("GEMMs (F.linear, incl. lm_head)", linear),
        ("decode attention (paged kernel)", decode_attn),
        ("prefill attention (gather + SDPA)", attention - decode_attn),
        ("KV cache writes (index_copy_)", kv_write),
        ("norms, RoPE, SiLU, residuals, op dispatch", forward - linear - attention - kv_write),
        ("batch to tensors, logits to CPU", cum("execute") - forward),
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
            f"GEMM FLOPs ({computed} computed tokens) take {gemm_s:.1f} s: the GEMMs ran at "
            f"{gemm_s * peak.flops / linear / 1e9:.0f} GFLOP/s, {gemm_s / linear:.2f} of the probe, the whole run at "
            f"{gemm_s / wall:.2f}. Other processes kept "
            f"{(busy1 - busy0 - (own1 - own0)) / wall:.2f} of the {os.cpu_count()} cores busy meanwhile.")


def report(args, llmos: dict, hf: dict, flops: float, bandwidth: float, others: float) -> str:
    threads = torch.get_num_threads()
    blocks = []
    P = llmos["num_parameters"]
    if "batch_s" in llmos:
        out_tok = llmos["output_tokens"]
        processed = llmos["computed_prompt_tokens"] + out_tok
        hf_processed = llmos["prompt_tokens"] + out_tok
        rows = []
        for name, r, proc in (("llmos", llmos, processed), ("transformers", hf, hf_processed)):
            tps = out_tok / r["batch_s"]
            rows.append([name, f"{r['batch_s']:.1f}", f"{tps:.1f}", f"{tps / (out_tok / hf['batch_s']):.2f}x",
                         f"{proc / r['batch_s'] * 2 * P / flops:.3f}", f"{tps * 2 * P / flops:.3f}",
                         f"{r['peak_rss'] / 2**30:.2f}"])
        blocks.append(
            f"### batch: {len(args.lengths)} chat requests, output {min(args.lengths)}..{max(args.lengths)} "
            f"tokens (EOS ignored), max_num_seqs {args.max_num_seqs}\n\n"
            + markdown_table(["system", "seconds", "output tok/s", "vs transformers", "MFU (prompt+output)",
                              "MFU (output)", "peak RSS GiB"], rows)
            + f"\n\n{out_tok} output tokens; {llmos['prompt_tokens']} prompt tokens, of which llmos computed "
              f"{llmos['computed_prompt_tokens']} (the rest were prefix-cache hits). MFU (prompt+output) counts "
              f"the prompt tokens each system computed plus the requested output tokens; transformers' padding "
              f"and the tokens it generates past a request's length are not counted as work.")
    if "single_s" in llmos:
        n = args.single_tokens
        rows = []
        for name, r in (("llmos", llmos), ("transformers", hf)):
            tps = (n - 1) / r["single_decode_s"]
            rows.append([name, f"{n / r['single_s']:.1f}", f"{tps:.1f}",
                         f"{tps / ((n - 1) / hf['single_decode_s']):.2f}x",
                         f"{tps * llmos['weight_bytes'] / bandwidth:.3f}"])
        same = next((i for i, (a, b) in enumerate(zip(llmos["single_tokens"], hf["single_tokens"])) if a != b), n)
        blocks.append(
            f"### single: one request, {n} new tokens (EOS ignored)\n\n"
            + markdown_table(["system", "end-to-end tok/s", "decode tok/s", "vs transformers", "MBU"], rows)
            + f"\n\nDecode tok/s times tokens 2..{n} (after the first token). MBU reads "
              f"{llmos['weight_bytes'] / 2**20:.0f} MiB of weights per token (KV reads not counted). "
              f"Both systems' greedy tokens agree for the first {same} of {n}.")
    blocks.append(f"Machine, measured in this run: fp32 GEMM {flops / 1e9:.0f} GFLOP/s, memory read "
                  f"{bandwidth / 1e9:.1f} GB/s; {threads} threads, OMP_WAIT_POLICY="
                  f"{os.environ['OMP_WAIT_POLICY']}, torch {torch.__version__}; {P / 1e6:.1f}M parameters. "
                  f"Other processes kept {others:.2f} of the {os.cpu_count()} cores busy while it ran.")
    return "\n\n".join(blocks)


def compare(args, chats) -> str:
    """Both systems one after the other, each in its own peak-RSS window."""
    # GEMM probes run before each timed part; bandwidth probes only between the systems'
    # peak-RSS windows.
    peak = MachinePeak()
    peak.sample()
    busy0, own0, t0 = *cpu_seconds(), time.perf_counter()
    results = []
    for run in (lambda: run_llmos(args, chats, args.lengths, peak),
                lambda: run_transformers(args, args.lengths, results[0], peak)):
        gc.collect()
        reset_peak_rss()
        results.append(run())
        peak.sample()
    busy1, own1 = cpu_seconds()
    others = (busy1 - busy0 - (own1 - own0)) / (time.perf_counter() - t0)
    return report(args, *results, peak.flops, peak.bandwidth, others)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["batch", "single", "all"], default="all")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--kv-cache-memory", default="1GiB")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for both systems")
    ap.add_argument("--decode-dtype", choices=["bfloat16", "float16"], default=None,
                    help="llmos keeps a half-precision weight copy for steps of <= 4 tokens")
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 requests, 64-token single stream")
    ap.add_argument("--profile", action="store_true", help="only profile llmos' batch mode")
    ap.add_argument("--write", action="store_true", help="record the result in docs/benchmarks.md")
    args = ap.parse_args()
    if args.quick:
        args.requests = min(args.requests, 8)
    args.single_tokens = 64 if args.quick else 256
    torch.set_num_threads(args.threads)
    chats, args.lengths = workload(args.requests)
    text = profile_llmos(args, chats, args.lengths) if args.profile else compare(args, chats)
    print(text)
    if args.write:
        exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else "python"
        name = "throughput" + "".join(f" {flag}" for flag in ("--quick", "--profile") if getattr(args, flag[2:]))
        name += "" if args.mode == "all" or args.profile else f" --mode {args.mode}"
        name += f" --decode-dtype {args.decode_dtype}" if args.decode_dtype else ""
        write_section(name, " ".join([exe] + sys.argv), text)


if __name__ == "__main__":
    main()
