"""One system, one task, in this process: the worker that benchmarks/throughput.py starts
afresh for every measurement, so each peer runs as its users run it (its own process, its
own default threading, nothing llmos set in its environment). Prints one JSON line.

    python benchmarks/peers.py SYSTEM TASK WORKLOAD.json

SYSTEM: llmos (defaults), llmos-int8, llmos-float32, llama.cpp (llama-cpp-python's default
threads), llama.cpp-2t (2 decode threads), transformers. TASK: single (one stream),
batch (all requests at once), prefill (one long prompt, time to its first token).
The workload file holds token ids (tokenized once by llmos' tokenizer, so every system
computes the same tokens) and output lengths."""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def llmos_worker(system: str, task: str, w: dict) -> dict:
    import llmos  # noqa: F401 (its OpenMP settings are part of how its users run it)
    from llmos import LLM, SamplingParams
    kw = {"llmos-int8": {"packed_activations": "int8"}, "llmos-float32": {"compute": "float32"}}.get(system, {})
    llm = LLM(w["model"], kv_cache_memory="1GiB", max_num_seqs=64, **kw)
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)   # noqa: E731
    llm.generate([w["warmup"]], greedy(8))
    plan = llm.engine.runner.plan.info()
    # The bytes a decode step reads: the VNNI panels where int8 steps multiply those instead.
    res = {"weight_bytes": plan.get("panel_bytes") or plan["weight_bytes"], "packed_max_tokens": plan["packed_max_tokens"]}
    if task == "single":
        out = llm.generate([w["single"]], greedy(w["single_tokens"]))[0]
        res["decode_s"] = out.metrics.finished_time - out.metrics.first_token_time
        res["tokens"] = out.token_ids
    elif task == "batch":
        t = time.perf_counter()
        outs = llm.generate(w["batch"], [greedy(n) for n in w["lengths"]])
        res["seconds"] = time.perf_counter() - t
        assert [len(o.token_ids) for o in outs] == w["lengths"]
    else:
        out = llm.generate([w["prefill"]], greedy(1))[0]
        res["seconds"] = out.metrics.first_token_time - out.metrics.arrival_time
    res["steps"] = llm.engine.runner.plan.info()["steps"]
    llm.close()
    return res


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level API (one llama_batch for many
    sequences), with llama-cpp-python's default threads unless told otherwise."""

    def __init__(self, path: str, n_seq: int, n_ctx: int, threads: int | None) -> None:
        import llama_cpp as L
        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_seq_max = n_ctx, 4096, n_seq
        cp.n_threads = threads or max(os.cpu_count() // 2, 1)      # llama_cpp.Llama's defaults
        cp.n_threads_batch = threads or os.cpu_count()
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(4096, 0, n_seq)

    def decode(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """items: (token, position, sequence, wants logits); returns the argmax for those that do."""
        import numpy as np
        L, b = self.L, self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, out) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        if L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        picks = []
        for i, it in enumerate(items):
            if it[3]:
                row = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,))
                picks.append(int(row.argmax()))
        return picks

    def run(self, prompts: list[list[int]], lengths: list[int]) -> tuple[list[list[int]], list[float]]:
        """Greedy, EOS ignored; all prompts prefilled in one batch, then one token of every
        unfinished sequence per llama_decode. Returns the tokens and each step's end time."""
        items = [(t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts) for p, t in enumerate(ids)]
        nxt = []
        for i in range(0, len(items), 4096):
            nxt += self.decode(items[i:i + 4096])
        outs = [[t] for t in nxt]
        times = [time.perf_counter()]
        while True:
            live = [s for s in range(len(prompts)) if len(outs[s]) < lengths[s]]
            if not live:
                return outs, times
            picks = self.decode([(outs[s][-1], len(prompts[s]) + len(outs[s]) - 1, s, True) for s in live])
            for s, t in zip(live, picks):
                outs[s].append(t)
            times.append(time.perf_counter())


def llama_worker(system: str, task: str, w: dict) -> dict:
    threads = 2 if system.endswith("-2t") else None
    n = len(w["batch"]) if task == "batch" else 1
    lc = LlamaCpp(w["gguf"], n, 512 * n if task == "batch" else 2048, threads)
    lc.run([w["warmup"]], [8])
    lc.L.llama_memory_clear(lc.L.llama_get_memory(lc.ctx), True)
    if task == "single":
        outs, times = lc.run([w["single"]], [w["single_tokens"]])
        return {"decode_s": times[-1] - times[0], "tokens": outs[0]}
    t = time.perf_counter()
    if task == "batch":
        outs, _ = lc.run(w["batch"], w["lengths"])
        assert [len(o) for o in outs] == w["lengths"]
    else:
        lc.run([w["prefill"]], [1])
    return {"seconds": time.perf_counter() - t}


def transformers_worker(system: str, task: str, w: dict) -> dict:
    import torch
    from llmos.models.loader import load_model, to_transformers
    model = to_transformers(load_model(w["model"]), attn_implementation="sdpa")
    pad, eos = w["eos"][0], w["eos"]

    @torch.inference_mode()
    def gen(prompts, new):
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=pad, eos_token_id=eos)

    gen([w["warmup"]], 8)
    if task != "batch":
        raise ValueError("transformers runs the batch task only here")
    t = time.perf_counter()
    for i in range(0, len(w["batch"]), 64):   # static batches of 64, each to its longest length
        gen(w["batch"][i:i + 64], max(w["lengths"][i:i + 64]))
    return {"seconds": time.perf_counter() - t}


def main() -> None:
    system, task, path = sys.argv[1:4]
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    w = json.loads(open(path).read())
    fn = llama_worker if system.startswith("llama.cpp") else (
        transformers_worker if system == "transformers" else llmos_worker)
    t0 = time.process_time()
    res = fn(system, task, w)
    res.update(system=system, task=task, peak_rss=rss_peak(), cpu_s=time.process_time() - t0)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
