"""The prefix cache's second tier on the real model: a prompt whose cached blocks the pool
had to reuse for other traffic is served by copying them back from host memory, and the
output is exactly what recomputing gives."""

from __future__ import annotations

from llmos import LLM, SamplingParams

HISTORY = ("You are a helpful assistant. " + " ".join(f"Note {i}: the meeting moved to room {i * 7}." for i in range(30)))


def _run(llm, prompt):
    return llm.submit(prompt, SamplingParams(max_tokens=12, temperature=0), tenant="conv").result()


def test_evicted_prefix_is_restored_from_host_memory_exactly(default_model_path):
    outs = {}
    for space in ("256MiB", 0):
        with LLM("smollm2-135m", kv_cache_memory="32MiB", prefix_swap_space=space) as llm:
            first = _run(llm, HISTORY + " Where is the meeting?")
            pool_tokens = llm.stats().kv_blocks.total * llm.stats().kv_blocks.block_size
            # Other tenants' distinct prompts, three times the pool: every free block is reused.
            others = [f"Story {i}: " + " ".join(f"w{i}x{j}" for j in range(60)) for i in range(12)]
            assert sum(len(llm.get_tokenizer().encode(p)) for p in others) > 2 * pool_tokens
            llm.generate(others, SamplingParams(max_tokens=2, temperature=0), tenant="other")
            again = _run(llm, HISTORY + " Where is the meeting?")
            outs[space] = (first, again, llm.stats().prefix_cache)
    first, again, stats = outs["256MiB"]
    assert again.metrics.num_cached_tokens >= len(again.prompt_token_ids) - 32
    assert stats.restored > 0 and stats.spilled > 0
    assert again.token_ids == first.token_ids
    first0, again0, stats0 = outs[0]
    assert again0.metrics.num_cached_tokens == 0 and stats0.restored == 0     # without it: recomputed
    assert again0.token_ids == again.token_ids
