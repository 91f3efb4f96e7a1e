"""The kernel on the real model: policy orderings on deterministic workloads, exact resume
after swap and recompute, quotas, admission control, suspend/resume/cancel, aging."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import assert_matches_reference
from llmos import LLM, SamplingParams
from llmos.config import EngineConfig
from llmos.engine.llm_engine import LLMEngine
from llmos.kernel.request import SequenceStatus
from llmos.errors import InvalidRequestError, PromptTooLongError, QueueFullError

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def make_engine(default_model_path, **kw) -> LLMEngine:
    kw.setdefault("kv_cache_memory", "64MiB")
    return LLMEngine(EngineConfig(model="smollm2-135m", **kw))


def first_token_order(engine: LLMEngine, seqs) -> list[str]:
    order: list[str] = []
    while engine.has_unfinished():
        engine.step()
        for s in seqs:
            if s.output_token_ids and s.request_id not in order:
                order.append(s.request_id)
    return order


def test_fcfs_serves_in_arrival_order(default_model_path):
    e = make_engine(default_model_path, max_num_seqs=2, scheduling_policy="fcfs")
    seqs = [e.add_request(f"Story {i}:", greedy(6), request_id=f"r{i}", priority=-i) for i in range(5)]
    assert first_token_order(e, seqs) == ["r0", "r1", "r2", "r3", "r4"]


def test_priority_preempts_a_full_batch_within_two_steps(default_model_path):
    e = make_engine(default_model_path, max_num_seqs=2, scheduling_policy="priority", aging_rate=0.0)
    low = [e.add_request(PROMPT, greedy(40), request_id=f"low{i}", priority=5) for i in range(2)]
    for _ in range(3):
        e.step()
    assert all(s.status is SequenceStatus.RUNNING for s in low)
    high = e.add_request("Urgent: what is 2+2?", greedy(4), request_id="high", priority=0)
    steps = 0
    while not high.output_token_ids:
        e.step()
        steps += 1
    assert steps <= 2
    assert sum(s.metrics.num_preemptions for s in low) == 1
    while e.has_unfinished():
        e.step()
    assert all(len(s.output_token_ids) == 40 for s in low)


def test_round_robin_rotates_by_quantum(default_model_path):
    e = make_engine(default_model_path, max_num_seqs=1, scheduling_policy="rr", rr_quantum=4)
    a = e.add_request("A:", greedy(12), request_id="a")
    b = e.add_request("B:", greedy(12), request_id="b")
    trace = []
    while e.has_unfinished():
        e.step()
        trace.append((len(a.output_token_ids), len(b.output_token_ids)))
    # Neither runs to completion while the other waits: they alternate in quanta.
    a_done = next(i for i, (x, _) in enumerate(trace) if x == 12)
    b_start = next(i for i, (_, y) in enumerate(trace) if y > 0)
    assert b_start < a_done
    assert a.metrics.num_preemptions >= 2 and b.metrics.num_preemptions >= 1


def test_fair_share_splits_tokens_by_weight(default_model_path):
    e = make_engine(default_model_path, max_num_seqs=6, scheduling_policy="fair", kv_cache_memory="128MiB")
    e.tenants.set("A", weight=2)
    e.tenants.set("B", weight=1)
    for i in range(12):
        e.add_request(f"A story {i}:", greedy(200), tenant="A")
        e.add_request(f"B story {i}:", greedy(200), tenant="B")
    for _ in range(60):
        e.step()
    a, b = e.tenants.get("A").tokens_served, e.tenants.get("B").tokens_served
    assert 1.7 < a / b < 2.3, (a, b)


def test_fair_share_gives_no_credit_for_idleness(default_model_path):
    e = make_engine(default_model_path, max_num_seqs=4, scheduling_policy="fair")
    for i in range(4):
        e.add_request(f"A {i}:", greedy(30), tenant="A")
    for _ in range(20):
        e.step()
    va = e.tenants.get("A").vtime
    assert va > 0
    e.add_request("B arrives:", greedy(5), tenant="B")
    assert e.tenants.get("B").vtime == pytest.approx(va)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preempted_generation_resumes_exactly(default_model_path, greedy_reference, mode):
    e = make_engine(default_model_path, preemption_mode=mode)
    seq = e.add_request(PROMPT, greedy(40))
    n = 0
    while e.has_unfinished():
        e.step()
        n += 1
        if n % 7 == 0 and seq.status is SequenceStatus.RUNNING:
            e.scheduler.preempt(seq)
            assert seq.block_table == [] and e.block_manager.num_used_blocks == 0
    assert seq.metrics.num_preemptions >= 4
    assert e.kernel.switcher.num_preemptions[mode] >= 4
    ref, gaps = greedy_reference(seq.prompt_token_ids, 40)
    assert_matches_reference(seq.output_token_ids, ref, gaps)
    if mode == "swap":
        assert e.kernel.switcher.swap.bytes_out > 0 and e.kernel.switcher.swap.bytes_in == e.kernel.switcher.swap.bytes_out


def test_swap_spills_to_disk_and_compresses_when_full(default_model_path, tmp_path, greedy_reference):
    e = make_engine(default_model_path, preemption_mode="swap", swap_space="1MiB", swap_dir=str(tmp_path))
    seqs = [e.add_request(PROMPT + f" {i}", greedy(20)) for i in range(3)]
    e.step()
    e.step()
    for s in seqs:
        e.scheduler.preempt(s)
    assert e.kernel.switcher.swap.num_compressed > 0 or e.kernel.switcher.swap.disk_used > 0
    assert e.kernel.switcher.swap.host_used <= e.kernel.switcher.swap.host_budget
    assert list(tmp_path.iterdir()), "past the host budget, swapped KV goes to the swap directory"
    while e.has_unfinished():
        e.step()
    assert all(len(s.output_token_ids) == 20 for s in seqs)
    assert not list(tmp_path.iterdir()) and e.kernel.switcher.swap.host_used == 0 and e.kernel.switcher.swap.disk_used == 0


def test_kv_quota_holds_back_a_tenants_extra_requests(default_model_path):
    e = make_engine(default_model_path, max_num_seqs=8)
    e.tenants.set("small", kv_quota=3)   # the prompt takes 2 blocks
    a = [e.add_request(PROMPT, greedy(10), tenant="small") for _ in range(3)]
    b = e.add_request(PROMPT, greedy(10), tenant="big")
    e.step()
    running = [s for s in a if s.status is SequenceStatus.RUNNING]
    assert len(running) == 1, "one request of the quota'd tenant runs, the rest wait"
    assert b.status is SequenceStatus.RUNNING
    while e.has_unfinished():
        e.step()
        used = sum(len(s.block_table) for s in a)
        assert used <= 3 or sum(1 for s in a if s.block_table) == 1
    assert all(len(s.output_token_ids) == 10 for s in a)


def test_queue_full_and_refusal(default_model_path):
    e = make_engine(default_model_path, max_waiting=2, kv_cache_memory="8MiB")
    e.add_request("a", greedy(4))
    e.add_request("b", greedy(4))
    with pytest.raises(QueueFullError, match="max_waiting=2"):
        e.add_request("c", greedy(4))
    e.add_request("c", greedy(4), tenant="other")   # the bound is per tenant
    capacity = e.block_manager.num_blocks * 16
    with pytest.raises(PromptTooLongError, match="never fit"):
        e.add_request("hello", greedy(capacity))
    with pytest.raises(InvalidRequestError, match="priority"):
        e.add_request("x", greedy(4), tenant="t2", priority="high")
    while e.has_unfinished():
        e.step()


def test_handles_suspend_resume_cancel(default_model_path, greedy_reference):
    with LLM(model="smollm2-135m", kv_cache_memory="64MiB") as llm:
        bm = llm.engine.block_manager
        h = llm.submit(PROMPT, greedy(60))
        deltas = iter(h)
        next(deltas)
        assert h.suspend()
        assert h.status == "suspended"
        time.sleep(0.3)
        assert bm.num_used_blocks == 0, "a suspended request holds no blocks in the pool"
        assert h.resume()
        out = h.result(timeout=120)
        assert out.metrics.inter_token_latency > 0 and out.metrics.num_swaps >= 1
        ref, gaps = greedy_reference(out.prompt_token_ids, 60)
        assert_matches_reference(out.token_ids, ref, gaps)

        h2 = llm.submit(PROMPT, greedy(500))
        next(iter(h2))
        assert h2.cancel()
        assert bm.num_used_blocks == 0, "a cancelled request's blocks return at once"
        assert h2.result(timeout=5).finish_reason == "abort"
        s = llm.stats()
        assert s.requests["running"] == 0 and s.preemptions["swap"] + s.preemptions["recompute"] == 0
        assert s.swap.bytes_out > 0
        assert s.histograms["time_to_first_token_seconds"]["default"].count >= 2


def test_submit_is_thread_safe(default_model_path):
    with LLM(model="smollm2-135m", kv_cache_memory="64MiB", scheduling_policy="fair") as llm:
        results, errors = [], []

        def client(i):
            try:
                results.append(llm.submit(f"Count to {i}:", greedy(8), tenant=f"t{i % 3}").result(timeout=300))
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(results) == 12
        assert all(len(r.token_ids) == 8 for r in results)
        assert llm.engine.block_manager.num_used_blocks == 0


def test_aging_lets_low_priority_finish_under_constant_high_priority_load(default_model_path):
    e = make_engine(default_model_path, max_num_seqs=1, scheduling_policy="priority", aging_rate=20.0)
    low = e.add_request("Low:", greedy(4), priority=10)
    for i in range(60):
        if low.is_finished:
            break
        if sum(1 for s in e.scheduler.waiting if s.priority == 0) < 2:
            e.add_request(f"High {i}:", greedy(4), priority=0)
        e.step()
    assert low.is_finished and len(low.output_token_ids) == 4


def test_priority_does_not_thrash_between_equal_priorities(default_model_path):
    # Slow aging (0.5 levels of hysteresis = 50 s of waiting), so only a defect can preempt here.
    e = make_engine(default_model_path, max_num_seqs=2, scheduling_policy="priority", aging_rate=0.01)
    seqs = [e.add_request(f"Story {i}:", greedy(12), priority=3) for i in range(4)]
    while e.has_unfinished():
        e.step()
    assert sum(e.kernel.switcher.num_preemptions.values()) == 0
    assert all(len(s.output_token_ids) == 12 for s in seqs)
