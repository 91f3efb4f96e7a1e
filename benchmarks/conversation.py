"""Conversations longer than the window, and the function library's overhead: parts of
`benchmarks/memory.py` (run them there, e.g. `--part long_conversation`).

- long_conversation: 300 turns, 20 facts planted in the first 60, a 1,024-token budget;
  for each later question about a planted fact, is the fact in the context llmos
  assembles? And how many prompt tokens each turn must compute, with a prefix cache, for
  llmos's layout against a naive full-history prompt and a naive sliding window. No model
  runs here: what is measured is the context, with the real tokenizer, embedder and store.
- kv_warm: the real engine. A conversation resumed after other tenants' traffic: what
  share of its prompt comes from the prefix cache, with light and with heavy traffic in
  between, against the same turns laid out as a sliding window.
- tool_overhead: what the worker pool adds to a call, against calling the function.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

BLOCK = 16        # the prefix cache shares whole KV blocks
MARKERS = 5       # tokens the chat template wraps around each message

RELATIONS = [("sister", "Oriane"), ("dentist", "Dr. Okafor"), ("landlord", "Mr. Petrakis"),
             ("cat", "Biscuit"), ("boss", "Hilde"), ("neighbour", "Tomasz"), ("piano teacher", "Mrs. Lindqvist"),
             ("best friend", "Anouk"), ("plumber", "Reggie"), ("grandmother", "Esperanza")]
CODES = [("wifi password", "tangerine-42"), ("locker number", "1187"), ("bike lock code", "5309"),
         ("flight number", "LX318"), ("storage unit", "B-77"), ("library card", "88213"),
         ("garage code", "4451"), ("licence plate", "KT-904-Z"), ("gym locker", "233"), ("parcel code", "QX7741")]
FILLER = ["Tell me something about the weather on {d}.", "I had pasta for lunch on {d}; any thoughts?",
          "Remind me to call someone on {d}.", "What should I read on the train on {d}?",
          "My meeting on {d} ran long again.", "I went for a run on {d} and felt great."]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _facts() -> list[tuple[str, str, str]]:
    """(statement, question, the answer's words) for 20 planted facts, questions paraphrased."""
    out = [(f"By the way, my {rel}'s name is {name}.", f"What was my {rel} called again?", name)
           for rel, name in RELATIONS]
    out += [(f"Please note that my {thing} is {code}.", f"Can you remind me what my {thing} was?", code)
            for thing, code in CODES]
    return out


def _script(turns: int = 300, seed: int = 0) -> list[tuple[str, str | None]]:
    """(user message, the answer it asks for or None): facts planted in the first 60 turns,
    filler, and from turn 100 on a question about a planted fact every 4th turn."""
    rng = random.Random(seed)
    facts = _facts()
    planted = sorted(rng.sample(range(60), len(facts)))
    script: list[tuple[str, str | None]] = []
    for t in range(turns):
        if t in planted:
            script.append((facts[planted.index(t)][0], None))
        elif t >= 100 and t % 4 == 0:
            _, question, answer = facts[rng.randrange(len(facts))]
            script.append((question, answer))
        else:
            script.append((rng.choice(FILLER).format(d=rng.choice(DAYS)), None))
    return script


def _recomputed(ids: list[int], cached: list[int]) -> int:
    """Prompt tokens a prefix cache of whole blocks cannot serve from `cached`."""
    common = 0
    for a, b in zip(ids, cached):
        if a != b:
            break
        common += 1
    return len(ids) - common // BLOCK * BLOCK


def long_conversation(budget: int = 1024, turns: int = 300) -> dict:
    from llmos.kernel.conversation import ConversationStore
    from llmos.kernel.memory import SemanticMemory
    from llmos.models.embedder import Embedder
    from llmos.models.loader import load_model
    tok = load_model("smollm2-135m").tokenizer
    embedder = Embedder()
    reply = "I see. Thanks for telling me."
    with tempfile.TemporaryDirectory() as d:
        memory = SemanticMemory(Path(d) / "m.db", embedder.embed, embedder.dimensions)
        convs = ConversationStore(Path(d) / "c.db", memory, lambda t: len(tok.encode(t)), budget=budget)
        conv = convs.create("bench", "long", "You are a helpful assistant with a long memory.")
        hits, asked = 0, 0
        ours, full, window, prompt_len, full_len = [], [], [], [], []
        prev_ours: list[int] = []
        prev_window: list[int] = []
        prev_full_reply = tok.encode(reply, add_special_tokens=False)
        history: list[dict] = [{"role": "system", "content": conv.system}]
        counts = [len(tok.encode_chat(history)[1])]
        t0 = time.perf_counter()
        for text, answer in _script(turns):
            conv = convs.get("bench", "long")
            ctx = convs.assemble(conv, text)
            if answer is not None:
                asked += 1
                hits += any(answer in m["content"] for m in ctx.messages)
            ids = tok.encode_chat(ctx.messages)[1]
            ours.append(_recomputed(ids, prev_ours))
            prompt_len.append(len(ids))
            prev_ours = ids + tok.encode(reply, add_special_tokens=False)
            history.append({"role": "user", "content": text})
            counts.append(len(tok.encode(text, add_special_tokens=False)) + MARKERS)
            full_len.append(sum(counts))
            full.append(counts[-1])           # with the whole history cached, only the new message
            w = _window(tok, history, counts, budget)
            window.append(_recomputed(w, prev_window))
            prev_window = w + tok.encode(reply, add_special_tokens=False)
            history.append({"role": "assistant", "content": reply})
            counts.append(len(prev_full_reply) + MARKERS)
            convs._append(conv, "user", text)
            convs._append(conv, "assistant", reply)
        seconds = time.perf_counter() - t0
        memory.close()
    late = slice(100, None)
    return {"turns": turns, "budget": budget, "questions": asked, "fact_in_context": hits / asked,
            "ours_prompt_tokens_mean": statistics.mean(prompt_len), "ours_prompt_tokens_max": max(prompt_len),
            "ours_recomputed_mean": statistics.mean(ours[late]),
            "full_history_prompt_tokens_final": full_len[-1],
            "full_history_recomputed_mean": statistics.mean(full[late]),
            "full_history_exceeds_8192_at_turn": next((i for i, n in enumerate(full_len) if n > 8192), None),
            "window_recomputed_mean": statistics.mean(window[late]),
            "seconds_per_turn": seconds / turns}


def _window(tok, history: list[dict], counts: list[int], budget: int) -> list[int]:
    """A naive sliding window: the system message and as many of the latest turns as fit
    (`counts`: each message's tokens with its template markers)."""
    room, start = budget - budget // 8 - counts[0], len(history)
    while start > 1 and counts[start - 1] <= room:
        room -= counts[start - 1]
        start -= 1
    return tok.encode_chat([history[0], *history[start:]])[1]


def kv_warm(turns: int = 10, budget: int = 1024) -> dict:
    """The real engine: per resumed turn, the share of the prompt served by the prefix
    cache, after light (2 short requests) or heavy (enough to cycle the pool) traffic."""
    from llmos import LLM, SamplingParams
    from llmos.kernel.conversation import ConversationStore
    from llmos.kernel.memory import SemanticMemory
    from llmos.models.embedder import Embedder
    embedder = Embedder()
    out: dict = {}
    rng = random.Random(1)
    for name, traffic, second_tier in (("light", "light", "256MiB"), ("heavy", "heavy", "256MiB"),
                                       ("heavy, no second tier", "heavy", 0)):
        llm = LLM("smollm2-135m", kv_cache_memory="64MiB", seed=0, prefix_swap_space=second_tier)
        tok = llm.get_tokenizer()
        pool_tokens = llm.stats().kv_blocks.total * BLOCK
        out["kv_pool_tokens"] = pool_tokens
        try:
            with tempfile.TemporaryDirectory() as d:
                memory = SemanticMemory(Path(d) / "m.db", embedder.embed, embedder.dimensions)
                convs = ConversationStore(Path(d) / "c.db", memory, lambda t: len(tok.encode(t)), budget=budget)
                shares, prompts = [], []

                def generate(messages, sampling):
                    r = llm.submit(messages, SamplingParams(max_tokens=24, temperature=0), tenant="conv").result()
                    shares.append(r.metrics.num_cached_tokens / len(r.prompt_token_ids))
                    prompts.append(len(r.prompt_token_ids))
                    return {"text": r.text, "finish_reason": r.finish_reason}

                for t in range(turns):
                    convs.send("bench", "warm", rng.choice(FILLER).format(d=rng.choice(DAYS)), generate=generate)
                    _other_traffic(llm, rng, 3 * pool_tokens if traffic == "heavy" else 0)
                memory.close()
        finally:
            llm.close()
        out[name] = {"cached_share_mean": statistics.mean(shares[1:]), "prompt_tokens_mean":
                     statistics.mean(prompts[1:])}
    return out


def _other_traffic(llm, rng, tokens: int) -> None:
    """Other tenants' requests between two turns: two short ones, or (heavy) distinct
    prompts adding up to `tokens`, enough to push every free block out of the cache."""
    from llmos import SamplingParams
    n = max(2, tokens // 400)
    prompts = [" ".join(rng.choice(FILLER).format(d=rng.choice(DAYS)) for _ in range(30 if tokens else 2))
               for _ in range(n)]
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0), tenant="other")


def tool_overhead(calls: int = 2000) -> dict:
    """Per-call cost of the pool (validation + queue + worker handoff) against a direct
    call of the same function, interleaved in rounds; medians of the rounds."""
    from llmos.tools.calculator import calculate
    from llmos.tools.pool import ToolPool
    from llmos.tools.registry import ToolContext, from_function

    def calculator(expression: str) -> float:
        return calculate(expression)

    tool = from_function(calculator)
    pool = ToolPool(8)
    ctx = ToolContext("bench", 1)
    direct, pooled = [], []
    try:
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                calculator("2 * (3 + 4) ** 2")
            direct.append((time.perf_counter() - t0) / calls)
            t0 = time.perf_counter()
            for _ in range(calls):
                pool.run(tool, tool.validate({"expression": "2 * (3 + 4) ** 2"}), ctx)
            pooled.append((time.perf_counter() - t0) / calls)
    finally:
        pool.shutdown()
    d, p = statistics.median(direct), statistics.median(pooled)
    return {"direct_us": d * 1e6, "pool_us": p * 1e6, "overhead_us": (p - d) * 1e6}


def markdown(results: dict) -> list[str]:
    from benchmarks.common import markdown_table
    out = []
    if "long_conversation" in results:
        r = results["long_conversation"]
        rows = [["llmos conversation", f"{r['ours_prompt_tokens_mean']:.0f} (max {r['ours_prompt_tokens_max']})",
                 f"{r['ours_recomputed_mean']:.0f}"],
                ["naive full history", f"{r['full_history_prompt_tokens_final']} at the end (past 8,192 at turn "
                 f"{r['full_history_exceeds_8192_at_turn']})", f"{r['full_history_recomputed_mean']:.0f}"],
                ["naive sliding window", "up to the budget", f"{r['window_recomputed_mean']:.0f}"]]
        out.append(f"### Long conversation\n\n{r['turns']} turns, 20 facts planted in the first 60, a "
                   f"{r['budget']}-token budget; from turn 100 every 4th turn asks about a planted fact in other "
                   f"words ({r['questions']} questions). The fact is in the assembled context for "
                   f"**{r['fact_in_context']:.2f}** of them (target >= 0.9: "
                   f"{'met' if r['fact_in_context'] >= 0.9 else 'NOT met'}). Prompt tokens a turn must compute "
                   f"with a prefix cache of 16-token blocks (turns 100-300, mean), against a naive prompt holding "
                   f"the whole history and a naive window of the latest turns that fit the same budget:\n\n"
                   + markdown_table(["layout", "prompt tokens", "recomputed per turn"], rows)
                   + f"\n\nThe full history recomputes least per turn (only the new message) but grows without "
                   f"bound and no longer fits the model's context after turn "
                   f"{r['full_history_exceeds_8192_at_turn']}; within the same budget llmos recomputes "
                   f"{r['window_recomputed_mean'] / r['ours_recomputed_mean']:.1f}x less than the sliding "
                   f"window, whose prefix shifts every turn. Assembly costs {r['seconds_per_turn'] * 1000:.0f} ms "
                   f"a turn (recall included).")
    if "kv_warm" in results:
        r = results["kv_warm"]
        out.append(f"### Warm KV on resume\n\nThe real engine with a {r['kv_pool_tokens']}-token KV pool; a "
                   f"conversation (budget 1,024) resumed after other tenants' requests: light traffic (two short "
                   f"requests) or heavy (distinct prompts adding up to three times the pool, which reuses every "
                   f"free block). Share of each resumed turn's prompt served from cache (mean over turns 2-10):\n\n"
                   + markdown_table(["traffic between turns", "prompt tokens", "from cache"],
                                    [[t, f"{r[t]['prompt_tokens_mean']:.0f}", f"{r[t]['cached_share_mean']:.2f}"]
                                     for t in ("light", "heavy", "heavy, no second tier")])
                   + "\n\nUnder heavy traffic the conversation's blocks leave the pool; the prefix cache's "
                   "second tier (`engine.prefix_swap_space`, host memory) keeps them and copies them back. "
                   "Without it (`prefix_swap_space = 0`, last row) the whole prompt is prefilled again.")
    if "tool_overhead" in results:
        r = results["tool_overhead"]
        out.append(f"### Tool call overhead\n\n`calculator` called directly vs through the worker pool "
                   f"(schema validation, queue, worker hand-off, result), medians of 5 interleaved rounds of 2,000 "
                   f"calls: {r['direct_us']:.0f} us vs {r['pool_us']:.0f} us, **{r['overhead_us']:.0f} us** per "
                   f"call added by the pool.")
    return out
