"""The engine on the real default model: exact greedy parity with transformers in batched,
prefix-cached, chunked and preempted runs; sampling, stops and streaming."""

from __future__ import annotations

import pytest

from conftest import assert_matches_reference
from llmos import LLM, SamplingParams
from llmos.errors import InvalidRequestError, PromptTooLongError

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
    "Q: What is 12 times 7?\nA:",
    "Hi",
    "The three primary colors are red, blue and",
    "Write a haiku about autumn leaves falling gently onto a quiet pond in the early morning light, "
    "where the mist still hangs over the water and the only sound is the distant call of a heron.",
    "import numpy as np\nimport torch\n\nclass Model(torch.nn.Module):\n    def __init__(self):",
    "List of European countries: Germany, Italy,",
]
N_NEW = 48
GREEDY = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(default_model_path):
    return LLM(model="smollm2-135m", kv_cache_memory="256MiB", max_num_seqs=64)


def check_against_reference(llm, greedy_reference, prompts, params=GREEDY):
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        ref, gaps = greedy_reference(out.prompt_token_ids, params.max_tokens)
        assert_matches_reference(out.token_ids, ref, gaps)
        assert out.finish_reason == "length"
    return outs


def test_batched_greedy_matches_transformers(llm, greedy_reference):
    outs = check_against_reference(llm, greedy_reference, PROMPTS)
    lens = {len(o.prompt_token_ids) for o in outs}
    assert len(lens) >= 6, "prompts should have different lengths"
    assert all(len(o.token_ids) == N_NEW for o in outs)
    assert outs[0].text == llm.get_tokenizer().decode(outs[0].token_ids)


def test_all_blocks_return_after_requests_finish(llm):
    llm.generate(PROMPTS[:3], SamplingParams(max_tokens=5, temperature=0.0))
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert not llm.engine.requests


def test_prefix_cache_hits_give_same_tokens(default_model_path, greedy_reference):
    llm = LLM(model="smollm2-135m", kv_cache_memory="256MiB", enable_prefix_caching=True)
    system = "You are a careful assistant. Answer briefly and precisely, and never make things up. " * 5
    convs = [[{"role": "system", "content": system}, {"role": "user", "content": q}]
             for q in ("What is the capital of Italy?", "Name a prime number.", "What color is the sky?")]
    first = llm.chat(convs[:1], GREEDY)[0]
    assert first.metrics.num_cached_tokens == 0
    outs = llm.chat(convs, GREEDY)
    common = next(i for i, (a, b) in enumerate(zip(first.prompt_token_ids, outs[1].prompt_token_ids)) if a != b)
    assert common >= 64
    for out in outs:
        assert out.metrics.num_cached_tokens >= common // 16 * 16, "the shared system prompt should come from the cache"
        ref, gaps = greedy_reference(out.prompt_token_ids, N_NEW)
        assert_matches_reference(out.token_ids, ref, gaps)
    # The very same prompt again: everything but the last partial block is cached.
    again = llm.chat(convs[:1], GREEDY)[0]
    assert again.token_ids == first.token_ids
    assert again.metrics.num_cached_tokens >= len(first.prompt_token_ids) - 16
    assert llm.engine.block_manager.prefix_hits > 0


def test_chunked_prefill_gives_same_tokens(default_model_path, greedy_reference):
    llm = LLM(model="smollm2-135m", kv_cache_memory="256MiB", max_num_batched_tokens=8)
    check_against_reference(llm, greedy_reference, PROMPTS[:5])


def test_preemption_under_tiny_kv_budget_gives_same_tokens(default_model_path, greedy_reference):
    # 12 blocks of 16 tokens: about two sequences' worth, so sequences are preempted and recomputed.
    llm = LLM(model="smollm2-135m", kv_cache_memory=12 * 16 * 2 * 30 * 3 * 64 * 4, max_num_seqs=8)
    assert llm.engine.block_manager.num_blocks == 12
    check_against_reference(llm, greedy_reference, PROMPTS[:6])
    assert sum(llm.engine.kernel.switcher.num_preemptions.values()) > 0
    assert llm.engine.block_manager.num_free_blocks == 12


def test_seeded_sampling_is_independent_of_batch(llm):
    p = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = llm.generate(PROMPTS[1], p)[0]
    others = [SamplingParams(max_tokens=30, temperature=1.0, seed=s) for s in range(4)]
    mixed = llm.generate(PROMPTS[3:5] + [PROMPTS[1]] + PROMPTS[5:7], others[:2] + [p] + others[2:])
    assert mixed[2].token_ids == alone.token_ids
    again = llm.generate(PROMPTS[1], p)[0]
    assert again.token_ids == alone.token_ids
    other_seed = llm.generate(PROMPTS[1], SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=99))[0]
    assert other_seed.token_ids != alone.token_ids


def test_stop_string_is_exact(llm):
    base = llm.generate(PROMPTS[1], SamplingParams(max_tokens=40, temperature=0.0))[0]
    words = base.text.split(" ")
    stop = " " + words[len(words) // 2]
    cut = base.text.index(stop)
    out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=40, temperature=0.0, stop=[stop]))[0]
    assert out.text == base.text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    deltas = list(llm.stream(PROMPTS[1], SamplingParams(max_tokens=40, temperature=0.0, stop=[stop])))
    assert "".join(d.text for d in deltas) == base.text[:cut]
    assert deltas[-1].finished and deltas[-1].finish_reason == "stop"


def test_stop_token_and_eos(llm):
    base = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    tok = base.token_ids[5]
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[tok]))[0]
    assert out.token_ids == base.token_ids[:base.token_ids.index(tok) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == tok
    chat = llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(max_tokens=200, temperature=0.0))[0]
    assert chat.finish_reason == "stop" and chat.token_ids[-1] in llm.get_tokenizer().eos_token_ids
    assert "<|im_end|>" not in chat.text and chat.text.strip()


def test_streaming_deltas_are_whole_characters(llm):
    prompt = "Translate to Japanese and add emoji: I love sushi and cherry blossoms. 日本語:"
    params = SamplingParams(max_tokens=60, temperature=0.8, seed=7)
    deltas = list(llm.stream(prompt, params))
    full = llm.generate(prompt, params)[0]
    assert "".join(d.text for d in deltas) == full.text
    assert all("\ufffd" not in d.text for d in deltas)
    assert sum(len(d.token_ids) for d in deltas) == len(full.token_ids)
    assert deltas[-1].finished and sum(d.finished for d in deltas) == 1


def test_logprobs(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3))[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok and lp.logprob <= 0
        assert len(lp.top_logprobs) == 3 and lp.top_logprobs[0][0] == tok   # greedy picks the top one
        assert lp.top_logprobs[0][2] >= lp.top_logprobs[1][2] >= lp.top_logprobs[2][2]


def test_metrics(llm):
    out = llm.generate(PROMPTS[2], SamplingParams(max_tokens=8, temperature=0.0))[0]
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time


def test_bad_inputs_get_clear_errors(llm):
    with pytest.raises(PromptTooLongError, match="context length"):
        llm.generate("word " * 9000, SamplingParams(max_tokens=10))
    with pytest.raises(PromptTooLongError, match="max_tokens"):
        llm.generate("hello", SamplingParams(max_tokens=100_000))
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens="10")
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidRequestError, match="prompt"):
        llm.generate([[1, 2, 10**9]], GREEDY)
    with pytest.raises(InvalidRequestError, match="prompt"):
        llm.generate([12.5], GREEDY)
    with pytest.raises(InvalidRequestError, match="sampling_params"):
        llm.generate(["a", "b"], [GREEDY])
    with pytest.raises(InvalidRequestError, match="messages"):
        llm.chat([{"role": "user"}, "oops"])
    with pytest.raises(InvalidRequestError, match="kv_cache_memory"):
        LLM(model="smollm2-135m", kv_cache_memory="lots")
    # Nothing half-admitted is left behind by a rejected batch.
    assert not llm.engine.requests and not llm.engine.scheduler.has_work()


def test_abort_frees_blocks_at_once(llm):
    bm = llm.engine.block_manager
    it = llm.stream(PROMPTS[6], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    next(it)
    assert bm.num_free_blocks < bm.num_blocks
    it.close()   # the consumer walks away: the generator aborts its request
    assert bm.num_free_blocks == bm.num_blocks
    assert not llm.engine.scheduler.has_work()
