"""The kernel's scheduling and memory parts on fake sequences, no model: a tiny KV "pool"
whose slots record which sequence and position wrote them, so every context switch can be
checked for exactness. Fast; the real-model tests in test_kernel.py stay."""

from __future__ import annotations

import pytest
import torch

from llmos.config import EngineConfig
from llmos.kernel.block_manager import BlockManager
from llmos.kernel.context_switch import ContextSwitcher
from llmos.kernel.policy import FCFS, FairShare, Policy, PriorityPolicy, RoundRobin
from llmos.kernel.request import Sequence, SequenceStatus
from llmos.kernel.scheduler import Scheduler
from llmos.kernel.swap import SwapSpace
from llmos.kernel.tenant import TenantTable
from llmos.sampling_params import SamplingParams

BS = 4


class Machine:
    """Scheduler + block manager + swap tier over a fake pool; `step()` plays the engine."""

    def __init__(self, num_blocks=16, policy="fcfs", mode="swap", max_seqs=8, budget=64, swap_bytes=1 << 20,
                 swap_dir=None, **policy_kw):
        self.pool = torch.zeros(1, 2, num_blocks, BS, 1, 1)
        self.tenants = TenantTable()
        self.bm = BlockManager(num_blocks, BS)
        self.policy = {"fcfs": FCFS, "priority": PriorityPolicy, "rr": RoundRobin, "fair": FairShare}[policy](
            self.tenants, **policy_kw)
        self.switcher = ContextSwitcher(self.bm, SwapSpace(swap_bytes, swap_dir), read_blocks=self.read,
                                        write_blocks=self.write, bytes_per_block=2 * BS * 4, mode=mode)
        self.sch = Scheduler(self.bm, self.policy, self.tenants, self.switcher, max_num_seqs=max_seqs,
                             max_num_batched_tokens=budget)
        self.ids = {}
        self.served: dict[str, int] = {}

    def read(self, blocks):
        return self.pool[:, :, blocks].clone()

    def write(self, blocks, data):
        self.pool[:, :, blocks] = data

    def add(self, name, prompt_len=6, max_tokens=8, tenant="default", priority=0, prompt=None, **kw):
        ids = prompt or [hash((name, i)) % 1000 for i in range(prompt_len)]
        seq = Sequence(name, None, ids, SamplingParams(max_tokens=max_tokens), None, tenant=tenant,
                       priority=priority, **kw)
        self.ids[name] = len(self.ids) + 1
        self.sch.add(seq)
        return seq

    def value(self, seq, pos):
        return self.ids[seq.request_id] * 1000 + pos

    def step(self):
        batch = self.sch.schedule()
        for item in batch:
            seq = item.seq
            for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens):
                b, off = seq.block_table[pos // BS], pos % BS
                self.pool[0, :, b, off] = self.value(seq, pos)
        samples = [item.samples for item in batch]
        for item in batch:
            self.served[item.seq.tenant] = self.served.get(item.seq.tenant, 0) + item.num_new_tokens
        self.sch.complete_step(batch, 0.001)
        for item, sampled in zip(batch, samples):
            if sampled:
                item.seq.output_token_ids.append(7)
                if len(item.seq.output_token_ids) >= item.seq.params.max_tokens:
                    self.sch.remove(item.seq)
                    item.seq.status = SequenceStatus.FINISHED
        return batch

    def kv_intact(self, seq) -> bool:
        """Every computed position of seq holds what seq wrote there."""
        for pos in range(seq.num_computed_tokens):
            b, off = seq.block_table[pos // BS], pos % BS
            if self.pool[0, 0, b, off].item() != self.value(seq, pos):
                if pos // BS < len(seq.block_table) and self.bm.blocks[seq.block_table[pos // BS]].ref_count > 1:
                    continue   # a shared prefix block: written by whoever computed it first
                return False
        return True

    def drain(self, limit=500):
        n = 0
        while self.sch.has_work() and n < limit:
            self.step()
            n += 1
        return n


# -- block manager ---------------------------------------------------------------------------
def test_prefix_blocks_are_shared_and_reference_counted():
    m = Machine()
    prompt = list(range(13))       # 3 full blocks + 1 token
    a = m.add("a", prompt=prompt)
    m.step()
    assert a.num_computed_tokens == 13
    b = m.add("b", prompt=prompt)
    m.step()
    assert b.num_cached_tokens == 12 and b.block_table[:3] == a.block_table[:3]
    assert all(m.bm.blocks[x].ref_count == 2 for x in a.block_table[:3])
    m.sch.remove(a)
    assert all(m.bm.blocks[x].ref_count == 1 for x in b.block_table[:3])
    m.sch.remove(b)
    assert m.bm.num_free_blocks == m.bm.num_blocks and m.bm.num_cached_blocks == 3
    c = m.add("c", prompt=prompt)
    m.step()
    assert c.num_cached_tokens == 12, "freed blocks keep their prefix until reused"


def test_allocation_respects_the_reserve_and_changes_nothing_when_it_fails():
    bm = BlockManager(4, BS)
    seq = Sequence("s", None, list(range(12)), SamplingParams(), None)
    assert not bm.allocate_prompt(seq, 12, reserve=2)
    assert seq.block_table == [] and bm.num_free_blocks == 4
    assert bm.allocate_prompt(seq, 12, reserve=1) and len(seq.block_table) == 3


# -- scheduler: preemption, quotas, exact context switches ---------------------------------------
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_takes_the_least_deserving_and_resume_is_exact(mode):
    m = Machine(num_blocks=10, policy="priority", mode=mode, aging_rate=0.0)
    low = [m.add(f"low{i}", prompt_len=8, max_tokens=12, priority=5) for i in range(3)]
    for _ in range(3):
        m.step()
    assert all(s.status is SequenceStatus.RUNNING for s in low)
    high = m.add("high", prompt_len=8, max_tokens=4, priority=0)
    m.step()
    assert high.status is SequenceStatus.RUNNING
    victims = [s for s in low if s.metrics.num_preemptions]
    assert victims == [low[2]], "the latest of equal priority is taken first"
    assert victims[0].status is (SequenceStatus.SWAPPED if mode == "swap" else SequenceStatus.WAITING)
    while m.sch.has_work():
        m.step()
        for s in low + [high]:
            if s.status is SequenceStatus.RUNNING:
                assert m.kv_intact(s), f"{s.request_id}'s KV changed across a context switch"
    assert all(len(s.output_token_ids) == 12 for s in low)
    assert m.switcher.num_preemptions[mode] >= 1 and m.bm.num_free_blocks == 10


def test_kv_quota_holds_a_tenant_back_but_not_others():
    m = Machine(num_blocks=32)
    m.tenants.set("A", kv_quota=4)
    a = [m.add(f"a{i}", prompt_len=12, max_tokens=4, tenant="A") for i in range(3)]
    b = [m.add(f"b{i}", prompt_len=8, max_tokens=4, tenant="B") for i in range(3)]
    m.step()
    held = m.bm.tenant_blocks(m.sch.running)
    assert held["A"] <= 4 and sum(s.status is SequenceStatus.RUNNING for s in a) == 1
    assert all(s.status is SequenceStatus.RUNNING for s in b)
    assert m.drain() and all(len(s.output_token_ids) == 4 for s in a + b)


def test_suspended_sequence_leaves_the_pool_and_resumes_exactly():
    m = Machine(mode="swap")
    s = m.add("s", prompt_len=9, max_tokens=10)
    for _ in range(4):
        m.step()
    computed = s.num_computed_tokens
    assert m.sch.suspend(s) and s.status is SequenceStatus.SUSPENDED and not s.block_table
    assert m.bm.num_free_blocks == m.bm.num_blocks
    for _ in range(3):
        assert m.step() == []
    assert m.sch.resume(s)
    m.step()
    assert s.num_computed_tokens == computed + 1 and m.kv_intact(s)
    assert m.switcher.num_preemptions == {"swap": 0, "recompute": 0}, "a suspension is not a preemption"


def test_swap_tier_compresses_then_spills_to_disk_and_gives_everything_back(tmp_path):
    swap = SwapSpace(host_bytes=1500, disk_dir=tmp_path)
    tensors = {f"k{i}": torch.randn(1, 2, 4, BS, 2, 8) for i in range(4)}   # 2 KiB each
    for k, t in tensors.items():
        swap.put(k, t)
    assert swap.num_compressed > 0 and swap.disk_used > 0 and swap.host_used <= 1500
    for k, t in tensors.items():
        back = swap.take(k)
        assert back.shape == t.shape and torch.allclose(back, t, atol=t.abs().max().item() / 100)
    assert swap.host_used == 0 and swap.disk_used == 0 and not list(tmp_path.iterdir())


# -- policies ----------------------------------------------------------------------------------
def test_fcfs_and_round_robin_orders():
    m = Machine(policy="fcfs", max_seqs=1)
    seqs = [m.add(f"s{i}", max_tokens=3) for i in range(3)]
    first = []
    while m.sch.has_work():
        for item in m.step():
            if item.seq.request_id not in first:
                first.append(item.seq.request_id)
    assert first == ["s0", "s1", "s2"]

    m = Machine(policy="rr", max_seqs=1, quantum=3)
    a, b = m.add("a", prompt_len=2, max_tokens=9), m.add("b", prompt_len=2, max_tokens=9)
    trace = [m.step()[0].seq.request_id for _ in range(8)]
    assert trace == ["a", "a", "b", "b", "a", "a", "a", "b"], trace


def test_fair_share_splits_tokens_by_tenant_weight():
    m = Machine(num_blocks=64, policy="fair", max_seqs=6)
    m.tenants.set("A", weight=2)
    m.tenants.set("B", weight=1)
    for i in range(6):
        m.add(f"a{i}", prompt_len=2, max_tokens=200, tenant="A")
        m.add(f"b{i}", prompt_len=2, max_tokens=200, tenant="B")
    for _ in range(60):
        m.step()
    ratio = m.served["A"] / m.served["B"]
    assert 1.8 < ratio < 2.2, ratio


def test_fair_share_is_hierarchical_inside_a_tenant():
    """Two agent processes of one tenant at weights 2:1 against another tenant: tenants split
    1:1, and inside the first, the processes split its half 2:1."""
    m = Machine(num_blocks=128, policy="fair", max_seqs=9)
    served: dict[str, int] = {}
    for i in range(6):
        m.add(f"p1-{i}", prompt_len=2, max_tokens=400, tenant="T", group="pid:1", weight=2.0)
        m.add(f"p2-{i}", prompt_len=2, max_tokens=400, tenant="T", group="pid:2", weight=1.0)
        m.add(f"u-{i}", prompt_len=2, max_tokens=400, tenant="U")
    for _ in range(120):
        for item in m.step():
            g = item.seq.group or "U"
            served[g] = served.get(g, 0) + item.num_new_tokens
    assert 0.9 < (served["pid:1"] + served["pid:2"]) / served["U"] < 1.1, served
    assert 1.8 < served["pid:1"] / served["pid:2"] < 2.2, served


def test_policy_from_config():
    t = TenantTable()
    p = Policy.from_config(EngineConfig(scheduling_policy="priority", aging_rate=0.5), t)
    assert isinstance(p, PriorityPolicy) and p.aging_rate == 0.5
    assert Policy.from_config(EngineConfig(scheduling_policy="rr", rr_quantum=7), t).quantum == 7
    assert isinstance(Policy.from_config(EngineConfig(scheduling_policy="fair"), t), FairShare)


def test_a_process_kv_quota_holds_back_only_its_own_requests():
    m = Machine(num_blocks=64)
    mine = [m.add(f"p{i}", prompt_len=12, max_tokens=4, group="pid:1", group_kv_quota=4) for i in range(3)]
    other = [m.add(f"q{i}", prompt_len=12, max_tokens=4, group="pid:2") for i in range(3)]
    m.step()
    assert sum(s.status is SequenceStatus.RUNNING for s in mine) == 1
    assert all(s.status is SequenceStatus.RUNNING for s in other)
    assert m.drain() and all(len(s.output_token_ids) == 4 for s in mine + other)


def test_a_step_counts_prompt_and_decode_tokens_apart():
    m = Machine()
    m.add("s", prompt_len=6, max_tokens=4)
    batch = m.sch.schedule()
    assert [(i.num_new_tokens, i.samples, i.is_prefill) for i in batch] == [(6, True, True)]
    assert m.sch.complete_step(batch, 0.01) == 6
    m.sch.running[0].output_token_ids.append(7)
    batch = m.sch.schedule()
    assert [(i.num_new_tokens, i.samples, i.is_prefill) for i in batch] == [(1, True, False)]
    assert m.sch.complete_step(batch, 0.01) == 0, "a decode step computes no prompt tokens"
