import math

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from llmos.engine.sampler import Sampler, SampledToken, SamplingRow, make_generator
from llmos.sampling_params import SamplingParams

VOCAB = 1000


def row(seed: int | None = 0, prompt=(), output=(), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(seed=seed, **params), list(prompt), list(output),
                       make_generator(seed, fallback_seed=12345))


def random_logits(n: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def sampled_ids(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    return [t.token_id for t in Sampler().sample(logits, rows)]


def test_greedy_is_argmax_and_ties_take_lowest_id():
    logits = random_logits(8)
    logits[3, 10] = logits[3, 20] = logits[3].max() + 1.0
    out = Sampler().sample(logits, [row(temperature=0.0) for _ in range(8)])
    assert [t.token_id for t in out] == logits.argmax(dim=-1).tolist()
    assert out[3].token_id == 10
    assert out[0] == SampledToken(out[0].token_id, None, None)


def test_greedy_rows_mixed_with_random_rows():
    logits = random_logits(6)
    rows = [row(seed=i, temperature=0.0 if i % 2 else 1.0) for i in range(6)]
    ids = sampled_ids(logits, rows)
    assert ids[1::2] == logits[1::2].argmax(dim=-1).tolist()


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = random_logits(16, scale=1.0)
    greedy = logits.argmax(dim=-1).tolist()
    assert sampled_ids(logits, [row(seed=i, top_k=1, temperature=1.5) for i in range(16)]) == greedy
    assert sampled_ids(logits, [row(seed=i, top_p=1e-6, temperature=1.5) for i in range(16)]) == greedy


def test_min_p_keeps_only_tokens_near_the_top():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]])).repeat(2000, 1)
    ids = sampled_ids(logits, [row(seed=i, min_p=0.5) for i in range(2000)])
    counts = torch.bincount(torch.tensor(ids), minlength=5).float()
    assert counts[2:].sum() == 0                      # 0.15 < 0.5 * 0.4
    assert chi_square(counts[:2], torch.tensor([4 / 7, 3 / 7])) < 10.8   # p = 0.001, df 1


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, top_k, top_p the way Hugging Face's logits warpers apply them."""
    x = logits / temperature
    if top_k:
        x = x.masked_fill(x < x.topk(top_k).values[-1], -math.inf)
    if top_p < 1.0:
        sorted_x, order = x.sort()
        removed = sorted_x.softmax(-1).cumsum(-1) <= 1 - top_p
        removed[-1] = False
        x = x.masked_fill(removed.scatter(0, order, removed), -math.inf)
    return x.softmax(-1)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.9, 6, 0.9)])
def test_samples_follow_the_filtered_distribution(temperature, top_k, top_p):
    draws = 4000
    logits = random_logits(1, vocab=8, seed=7, scale=1.0)
    expected = reference_probs(logits[0], temperature, top_k, top_p)
    rows = [row(seed=i, temperature=temperature, top_k=top_k, top_p=top_p) for i in range(draws)]
    counts = torch.bincount(torch.tensor(sampled_ids(logits.expand(draws, -1), rows)), minlength=8).float()
    kept = expected > 0
    assert counts[~kept].sum() == 0
    assert chi_square(counts[kept], expected[kept]) < 26.1   # p = 0.001 for df <= 7


def test_wide_nucleus_beyond_the_first_candidate_guess():
    """A flat distribution's nucleus spans far more tokens than the sampler first fetches."""
    draws = 4000
    logits = torch.zeros(1, 400)
    logits[0, :100] = 2.0 + 0.001 * torch.arange(100)
    expected = reference_probs(logits[0], 1.0, 0, 0.5)
    kept = expected > 0
    assert 64 < kept.sum() < 100
    ids = sampled_ids(logits.expand(draws, -1), [row(seed=i, top_p=0.5) for i in range(draws)])
    counts = torch.bincount(torch.tensor(ids), minlength=400).float()
    assert counts[~kept].sum() == 0
    assert chi_square(counts[kept], expected[kept]) < 120   # p = 0.001 for df = 70


def test_seeded_rows_are_batch_invariant():
    """The same seeded request gives the same tokens alone, or at any row of any batch.

    Request 6's nucleus (about 450 tokens) is wider than the sampler's first guess, so alone it
    is drawn over the whole vocabulary; beside request 7 (top_k=700) it is drawn among the
    fetched candidates. Both ways must give the same token.
    """
    def logits_for(request: int, step: int) -> torch.Tensor:
        return random_logits(1, seed=1000 * request + step, scale=2.0)[0]

    settings = [dict(temperature=0.8, top_p=0.9), dict(temperature=1.0, top_k=20),
                dict(temperature=0.6, min_p=0.1), dict(temperature=1.0),
                dict(temperature=0.0), dict(temperature=1.2, top_k=50, top_p=0.95, min_p=0.02),
                dict(temperature=1.0, top_p=0.97), dict(temperature=1.0, top_k=700)]

    def run(requests: list[int]) -> dict[int, list[int]]:
        rows = {r: row(seed=r, **settings[r % len(settings)]) for r in requests}
        for step in range(12):
            logits = torch.stack([logits_for(r, step) for r in requests])
            for r, tok in zip(requests, sampled_ids(logits, [rows[r] for r in requests])):
                rows[r].output_token_ids.append(tok)
        return {r: rows[r].output_token_ids for r in requests}

    alone = {r: run([r])[r] for r in range(len(settings))}
    assert run(list(range(len(settings)))) == alone
    mixed = run([40, 2, 17, 6, 0, 5, 23, 1, 4, 7, 3])
    assert all(mixed[r] == alone[r] for r in range(len(settings)))
    assert run([6, 0, 1]) == {r: alone[r] for r in (6, 0, 1)}


def test_make_generator_uses_seed_else_fallback():
    a, b = make_generator(7, 1), make_generator(7, 2)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    c, d = make_generator(None, 1), make_generator(None, 2)
    assert not torch.equal(torch.rand(4, generator=c), torch.rand(4, generator=d))


def test_row_without_generator_still_samples():
    logits = random_logits(2)
    rows = [SamplingRow(SamplingParams(temperature=1.0, top_k=3), [], [], None) for _ in range(2)]
    for r, t in zip(range(2), Sampler().sample(logits, rows)):
        assert t.token_id in logits[r].topk(3).indices.tolist()


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = random_logits(2, vocab=10)
    rows = [row(prompt=[1, 2], output=[3, 3, 3, 4], presence_penalty=0.5, frequency_penalty=0.25),
            row(prompt=[5], output=[6])]
    out = Sampler.apply_penalties(logits, rows)
    expected = logits.clone()
    for token, count in {3: 3, 4: 1}.items():
        expected[0, token] -= 0.25 * count + 0.5
    assert torch.allclose(out, expected)
    assert torch.equal(out[1], logits[1])          # neutral row untouched
    assert not torch.equal(out, logits)            # the caller's logits are not changed in place


def test_repetition_penalty_matches_transformers():
    logits = random_logits(3, vocab=50)
    prompts, outputs = [[1, 2, 3], [7, 7], [10]], [[4, 1], [8], [11, 12, 13]]
    rows = [row(prompt=p, output=o, repetition_penalty=1.3) for p, o in zip(prompts, outputs)]
    ours = Sampler.apply_penalties(logits, rows)
    processor = RepetitionPenaltyLogitsProcessor(penalty=1.3)
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        theirs = processor(torch.tensor([p + o]), logits[i:i + 1].clone())
        assert torch.allclose(ours[i], theirs[0])


def test_greedy_uses_penalized_logits():
    logits = torch.tensor([[5.0, 4.9, 1.0]])
    out = Sampler().sample(logits, [row(temperature=0.0, output=[0], frequency_penalty=1.0)])
    assert out[0].token_id == 1


def test_logprobs_come_from_raw_log_softmax():
    logits = random_logits(3)
    rows = [row(temperature=0.0, logprobs=5, repetition_penalty=2.0, output=[1, 2]),
            row(seed=3, temperature=0.9, top_p=0.9, logprobs=0),
            row(temperature=0.0)]
    out = Sampler().sample(logits, rows)
    reference = torch.log_softmax(logits, dim=-1)
    for i in (0, 1):
        assert out[i].logprob == pytest.approx(float(reference[i, out[i].token_id]), abs=1e-5)
    top = reference[0].topk(5)
    assert [t for t, _ in out[0].top_logprobs] == top.indices.tolist()
    assert [lp for _, lp in out[0].top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert out[1].top_logprobs == []
    assert out[2].logprob is None and out[2].top_logprobs is None
