"""Packed 4/8-bit weights: the kernels against a float32 reference of the same dequantized
weights (gguf's own numpy dequantizer), every type, both variants, the AVX2 and the portable
code, odd shapes, real weights; then the real model on each compute path: perplexity,
greedy agreement, memory, and the errors a user gets for settings that cannot work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from llmos import LLM, SamplingParams
from llmos.engine import packed
from llmos.errors import InvalidRequestError, LLMOSError, ModelLoadError
from llmos.models.packed import PackedTensor

TYPES = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q8_0": Q.Q8_0}
K_TYPES = {"q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K}   # no quantizer here: random valid blocks
ISAS = (["portable"] + (["avx2"] if packed.kernels().has_avx2() else [])
        + (["avx512vnni"] if packed.kernels().has_avx512vnni() else []))
TEXT = (Path(__file__).parent / "data" / "perplexity.txt").read_text()


def reference(p: PackedTensor) -> torch.Tensor:
    """float32 weights from gguf's numpy dequantizer: independent of the C++ code under test."""
    w = gguf_dequantize(p.data.numpy().reshape(-1), {**TYPES, **K_TYPES}[p.qtype])
    return torch.from_numpy(np.asarray(w, dtype=np.float32)).reshape(p.shape)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("qtype", sorted(TYPES))
def test_quantize_matches_llama_cpp_reference_bytes(qtype):
    w = torch.randn(37, 96) * torch.logspace(-2, 1, 96)      # odd row count, columns of mixed scale
    ours = packed.quantize(w, qtype)
    theirs = gguf_quantize(w.numpy(), TYPES[qtype])
    assert ours.data.numel() == theirs.size
    assert (ours.data.numpy().reshape(-1) == theirs.reshape(-1)).mean() > 0.999
    assert rel(reference(ours), w) < (0.01 if qtype == "q8_0" else 0.12)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", sorted(TYPES))
def test_kernels_match_float32_of_the_same_weights(qtype, isa):
    torch.manual_seed(0)
    p = packed.quantize(torch.randn(37, 160), qtype)
    ref = reference(p)
    assert torch.equal(packed.dequantize(p, isa=isa), ref)
    for m in (1, 2, 3, 4, 5, 17):
        x = torch.randn(m, 160)
        want = x @ ref.T
        assert rel(packed.matmul(x, p, int8=False, isa=isa), want) < 1e-5, m
        assert rel(packed.matmul(x, p, int8=True, isa=isa), want) < 0.02, m
    for m in (1, 17, 300):      # the dequantized-tile GEMM of wide steps
        x = torch.randn(m, 160)
        assert rel(packed.gemm(x, p, isa=isa), x @ ref.T) < 1e-5, m


def k_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> PackedTensor:
    """K-quant rows as a file could hold them: random scales, mins and values, with the fp16
    super-block scales set to sizes a real model has (random bytes could be inf or NaN)."""
    from llmos.models.packed import BLOCK_BYTES
    g = np.random.default_rng(seed)
    nb = rows * cols // 256
    data = g.integers(0, 256, size=(nb, BLOCK_BYTES[qtype]), dtype=np.uint8)
    for at in ((208,) if qtype == "q6_k" else (0, 2)):
        data[:, at:at + 2] = g.uniform(1e-4, 1e-3, nb).astype(np.float16).view(np.uint8).reshape(nb, 2)
    return PackedTensor(torch.from_numpy(data.reshape(-1)), qtype, (rows, cols))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", sorted(K_TYPES))
def test_k_quant_kernels_match_float32_of_the_same_weights(qtype, isa):
    """Q4_K/Q5_K/Q6_K stay in their super-blocks: decoded to the same floats as gguf-py's
    dequantizer, and multiplied exactly (int8 activations are not offered for them: the
    exact product is what they get)."""
    p = k_blocks(qtype, 37, 512)
    ref = reference(p)
    assert torch.equal(packed.dequantize(p, isa=isa), ref)
    for m in (1, 2, 5, 17):
        x = torch.randn(m, 512)
        want = x @ ref.T
        assert rel(packed.matmul(x, p, int8=False, isa=isa), want) < 1e-5, m
        assert rel(packed.matmul(x, p, int8=True, isa=isa), want) < 1e-5, m
        assert rel(packed.gemm(x, p, isa=isa), want) < 1e-5, m
    with pytest.raises(ModelLoadError, match="multiple of 256"):
        PackedTensor(torch.zeros(4 * 144, dtype=torch.uint8), qtype, (4, 288))


@pytest.mark.skipif(len(ISAS) < 2, reason="this CPU has no AVX2: the portable kernels are all there is")
@pytest.mark.parametrize("isa", ISAS[1:])
@pytest.mark.parametrize("qtype", sorted(TYPES))
def test_simd_and_portable_kernels_agree(qtype, isa):
    """The same integer dot products and scales: equal up to float summation order. 288
    columns: 9 blocks, an odd count, so the two-block AVX-512 loop has a tail."""
    torch.manual_seed(1)
    p = packed.quantize(torch.randn(64, 288), qtype)
    x = torch.randn(7, 288) * 3
    for int8 in (False, True):
        a, b = packed.matmul(x, p, int8, isa), packed.matmul(x, p, int8, "portable")
        assert rel(a, b) < 1e-5, int8


def test_real_weights_of_the_default_model(default_model_path):
    tensors = {t.name: t for t in GGUFReader(default_model_path).tensors}
    for name in ("blk.0.ffn_down.weight", "blk.7.attn_q.weight", "token_embd.weight"):
        t = tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))
        p = PackedTensor(torch.from_numpy(np.array(t.data, dtype=np.uint8)), t.tensor_type.name.lower(), shape)
        ref = reference(p)
        x = torch.randn(3, shape[1])
        for isa in ISAS:
            assert torch.equal(packed.dequantize(p, isa=isa), ref), (name, isa)
            assert rel(packed.matmul(x, p, False, isa), x @ ref.T) < 1e-5, (name, isa)
            assert rel(packed.matmul(x, p, True, isa), x @ ref.T) < 0.02, (name, isa)


def test_dequant_linear_tiles_a_wide_matrix():
    """Both ways of a wide step: per-thread L2 tiles and the BLAS GEMM (a big decode step's LM
    head), and 8 MiB tiles through F.linear (a long prompt)."""
    p = packed.quantize(torch.randn(5000, 512), "q4_1")       # more rows than one 8 MiB tile holds
    for m in (9, packed.L2_TILE_MAX_TOKENS + 1):
        x = torch.randn(m, 512)
        out = packed.dequant_linear(x, p, packed.scratch_for([p]))
        assert out.shape == (m, 5000) and rel(out, x @ reference(p).T) < 1e-5, m
    with pytest.raises(RuntimeError, match="float32"):
        packed.gemm(torch.randn(3, 512, dtype=torch.float64), p)


def test_bad_shapes_and_types_are_refused_clearly():
    with pytest.raises(ModelLoadError, match="multiple of 32"):
        packed.quantize(torch.randn(4, 50), "q8_0")
    with pytest.raises(ModelLoadError, match="multiple of 32"):
        PackedTensor(torch.zeros(4 * 34, dtype=torch.uint8), "q8_0", (4, 50))
    with pytest.raises(ModelLoadError, match="cannot hold"):
        PackedTensor(torch.zeros(100, dtype=torch.uint8), "q8_0", (4, 32))
    with pytest.raises(ModelLoadError, match="q3_k"):
        PackedTensor(torch.zeros(100, dtype=torch.uint8), "q3_k", (4, 32))
    with pytest.raises(ModelLoadError, match="different types"):
        PackedTensor.cat([packed.quantize(torch.randn(2, 32), "q8_0"), packed.quantize(torch.randn(2, 32), "q4_0")])
    with pytest.raises(InvalidRequestError, match="compute"):
        LLM("smollm2-135m", compute="fast")
    with pytest.raises(InvalidRequestError, match="quantization"):
        LLM("smollm2-135m", quantization="q3_k")
    with pytest.raises(InvalidRequestError, match="packed_activations"):
        LLM("smollm2-135m", packed_activations="int4")


VNNI = packed.kernels().has_avx512vnni()


@pytest.mark.skipif(not VNNI, reason="the panel layout is for AVX-512 VNNI, which this CPU lacks")
@pytest.mark.parametrize("qtype", sorted(TYPES))
def test_vnni_panels_give_the_int8_variants_numbers(qtype):
    """The panels (16 rows interleaved for vpdpbusd) compute what the row-by-row int8 kernel
    computes (the same 8-bit activations and integer products, summed in another order), for a
    row count that fills no panel and step sizes that fill no tile of 8 tokens."""
    torch.manual_seed(0)
    p = packed.quantize(torch.randn(37, 160) * torch.logspace(-2, 0, 160), qtype)
    ref = reference(p)
    assert p.panels is None and packed.attach_panels([p]) == p.panels.numel() > 0
    assert packed.attach_panels([p]) == 0                     # attached once
    for m in (1, 7, 8, 9, 17, 64):
        x = torch.randn(m, 160)
        got = packed.matmul(x, p, int8=True)                  # auto: the panels
        assert got.shape == (m, 37)
        assert rel(got, packed.matmul(x, p, int8=True, isa="avx512vnni")) < 1e-5, m   # row by row
        assert rel(got, x @ ref.T) < 0.02, m
    # The exact variant never reads them.
    assert torch.equal(packed.matmul(x, p, int8=False), packed.matmul(x, p, int8=False, isa="avx512vnni"))


@pytest.mark.skipif(not VNNI, reason="the panel layout is for AVX-512 VNNI, which this CPU lacks")
def test_panels_refuse_what_they_cannot_hold():
    k = packed.kernels()
    p = packed.quantize(torch.randn(20, 64), "q4_1")
    with pytest.raises(RuntimeError, match="panels hold Q4_0, Q4_1 or Q8_0"):
        k.repack_panels(p.data, 12, 20, 64)
    with pytest.raises(RuntimeError, match="uint8 repacking of a \\[20, 64\\] matrix"):
        k.matmul_panels(torch.randn(2, 64), torch.zeros(10, dtype=torch.uint8), 3, 20, 64)
    with pytest.raises(RuntimeError, match="activations must be float32"):
        k.matmul_panels(torch.randn(2, 32), k.repack_panels(p.data, 3, 20, 64), 3, 20, 64)
    kq = PackedTensor(torch.zeros(4 * 144, dtype=torch.uint8), "q4_k", (4, 256))
    assert packed.attach_panels([kq]) == 0 and kq.panels is None    # K-quants stay on the exact kernels


# -- the real model on each path -------------------------------------------------------------------

@pytest.fixture(scope="module")
def engines(default_model_path):
    """The default Q4_1 model three ways: float32 (the reference), packed exact, packed int8."""
    made = {name: LLM("smollm2-135m", kv_cache_memory="64MiB", compute=c, packed_activations=a)
            for name, (c, a) in {"float32": ("float32", "float32"), "exact": ("packed", "float32"),
                                 "int8": ("packed", "int8")}.items()}
    yield made
    for llm in made.values():
        llm.close()


def test_packed_weights_take_a_fifth_of_the_memory(engines):
    f32, q = engines["float32"].engine.runner.plan, engines["exact"].engine.runner.plan
    assert f32.weight_types == {"float32": 121} and q.weight_types == {"q4_1": 120, "q8_0": 1}
    assert q.weight_bytes < f32.weight_bytes / 5


def test_perplexity_of_the_packed_paths(engines):
    ppl = {name: llm.engine.perplexity(TEXT) for name, llm in engines.items()}
    assert 5 < ppl["float32"] < 40, ppl                    # the model reads English
    assert abs(ppl["exact"] / ppl["float32"] - 1) < 0.01, ppl
    assert abs(ppl["int8"] / ppl["float32"] - 1) < 0.03, ppl
    plan = engines["int8"].engine.runner.plan
    assert plan.steps["packed"] >= 1
    assert plan.panels == VNNI                             # on VNNI CPUs that was the panels' perplexity
    if VNNI:
        assert plan.info()["panel_bytes"] > plan.weight_bytes / 2
        assert engines["exact"].engine.runner.plan.panel_bytes == 0   # the exact variant holds none


def test_greedy_outputs_of_the_exact_path_agree_with_float32(engines):
    topics = ["rivers", "bread", "the moon", "trains", "chess", "bees", "winter", "music"]
    asks = ["Tell me one fact about {}.", "Write a sentence about {}.", "What is special about {}?",
            "Give a short tip about {}."]
    chats = [[{"role": "user", "content": a.format(t)}] for t in topics for a in asks]
    assert len(chats) >= 32
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    runs = {name: [o.token_ids for o in engines[name].chat(chats, p)] for name in ("float32", "exact")}
    same = sum(a == b for a, b in zip(*runs.values()))
    assert same >= 0.9 * len(chats), f"{same}/{len(chats)} identical"


def random_contexts(runner) -> None:
    """Every KV slot a distinct random key and value (not zeros), the same for every runner."""
    torch.manual_seed(0)
    for k, v in runner.kv_caches:
        k.normal_()
        v.normal_()


def test_every_decode_path_computes_the_same_logits(default_model_path):
    """A decode step in the C++ stack on the packed kernels, in the stack on dequantized tiles
    and the BLAS GEMM, and op by op in float32: the same logits up to summation order, for
    step sizes that fill no tile evenly and contexts that fill no KV block (nor a run of 16
    positions) evenly."""
    with LLM("smollm2-135m", kv_cache_memory="256MiB", compute="packed") as llm:
        runner = llm.engine.runner
        assert runner.model.stack is not None and packed.kernels().has_blas()
        random_contexts(runner)
        for n, ctx in ((1, 45), (2, 200), (5, 32), (17, 173)):
            logits = {path: runner.scratch_decode(n, path, ctx) for path in ("kernels", "gemm", "float32")}
            assert logits["kernels"].shape[0] == n
            # Random contexts make the 30 layers amplify rounding differences more than real
            # text does (up to about 3e-4 here); a misplaced position or head gives 1e-2 and more.
            for path in ("gemm", "float32"):
                assert rel(logits[path], logits["kernels"]) < 1e-3, (n, ctx, path)
            assert torch.equal(logits["kernels"].argmax(-1), logits["gemm"].argmax(-1))
        random_contexts(runner)
        exact = runner.scratch_decode(17, "gemm", 60)
    # Under int8 activations a step on the GEMM path still multiplies float32 activations.
    with LLM("smollm2-135m", kv_cache_memory="256MiB", compute="packed", packed_activations="int8") as llm:
        runner = llm.engine.runner
        random_contexts(runner)
        assert rel(runner.scratch_decode(17, "gemm", 60), exact) < 1e-5
        assert rel(runner.scratch_decode(17, "kernels", 60), exact) > 1e-4     # the int8 kernels round
        # (How far: on random contexts any two int8 paths differ by 20-60 % in the logits, the
        # row-by-row kernels as much as the panels, since a rounding flip in one 8-bit block
        # grows through 30 layers; their quality is the perplexity test's, on real text.)


def test_the_plan_puts_big_decode_steps_on_the_gemm():
    """The crossovers from timings: kernels for small steps, the stack's GEMM path from where it
    wins for good, the stack for every decode step when it won at the largest size."""
    plan = packed.ComputePlan("auto", int8=False)
    ms = lambda k, g, f: {"kernels": k / 1e3, "gemm": g / 1e3, "float32": f / 1e3}   # noqa: E731
    plan.timings = {1: ms(10, 20, 70), 2: ms(12, 21, 75), 4: ms(20, 25, 90), 8: ms(30, 29, 120),
                    16: ms(70, 65, 150), 32: ms(150, 110, 160), 64: {"gemm": 0.19, "float32": 0.23}}
    plan.decide((1, 2, 4, 8, 16, 32, 64))
    assert plan.gemm_min_tokens == 8          # 8 won by a hair, and every size after it
    assert plan.packed_max_tokens == 16       # op by op: kernels while a fifth faster than float32
    assert plan.stack_max_tokens == 1 << 30
    plan.timings[64]["gemm"] = 0.24           # a tie (within a tenth) is noise: the stack keeps it
    plan.decide((1, 2, 4, 8, 16, 32, 64))
    assert plan.stack_max_tokens == 1 << 30
    plan.timings[64]["gemm"] = 0.27           # the stack lost at the largest size: float32 beyond 32
    plan.decide((1, 2, 4, 8, 16, 32, 64))
    assert plan.stack_max_tokens == 32
    assert plan.stack(32) and not plan.stack(33) and plan.steps["stack"] == 1


def test_the_plan_keeps_every_step_on_the_panels_where_they_win_throughout():
    """int8 activations on VNNI panels: the kernels beat the GEMM at every size measured, so
    every decode step runs on them in the stack and every other step (prompts, the LM head) on
    them op by op, past the largest size measured too; without panels the old limits hold."""
    ms = lambda k, g, f: {"kernels": k / 1e3, "gemm": g / 1e3, "float32": f / 1e3}   # noqa: E731
    timings = {1: ms(6, 20, 24), 2: ms(7, 23, 30), 4: ms(7, 28, 35), 8: ms(10, 38, 48), 16: ms(19, 52, 80),
               32: ms(36, 75, 89), 64: ms(66, 123, 132)}
    sizes = (1, 2, 4, 8, 16, 32, 64)
    for panels, limit in ((True, 1 << 30), (False, 64)):
        plan = packed.ComputePlan("auto", int8=True, panels=panels)
        plan.timings = timings
        plan.decide(sizes)
        assert (plan.gemm_min_tokens, plan.stack_max_tokens, plan.packed_max_tokens) == (0, limit, limit)
    plan.timings = {**timings, 64: ms(140, 123, 132)}     # the kernels lost at the largest size
    plan.panels = True
    plan.decide(sizes)
    assert plan.packed_max_tokens == 32 and plan.stack_max_tokens == 1 << 30 and plan.gemm_min_tokens == 64


def test_compute_packed_needs_quantized_weights(tmp_path, default_model_path):
    from test_model_tiny import _tiny
    _tiny("llama", tmp_path)
    with pytest.raises(LLMOSError, match="needs quantized weights"):
        LLM(str(tmp_path), kv_cache_memory="16MiB", compute="packed")
    with LLM(str(tmp_path), kv_cache_memory="16MiB", compute="packed", quantization="q8_0") as llm:
        plan = llm.engine.runner.plan
        assert plan.weight_types.get("q8_0", 0) > 0 and plan.packed_max_tokens > 1000
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
        assert len(out.token_ids) == 4
