"""The sampler: one next token for every row of a batch, each row drawn from its own RNG."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

import torch

from llmos.sampling_params import SamplingParams

# First guess at how many of the most likely tokens hold a row's nucleus (top_p); the guess
# grows 16x for the rows whose cut lies beyond it, so flat distributions still come out exact.
_NUCLEUS_GUESS = 64


@dataclass
class SamplingRow:
    """What the sampler needs to know about one request in the batch."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None


class SampledToken(NamedTuple):
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def _flatten(lists: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) of every token in per-row id lists, for one scatter."""
    rows = torch.repeat_interleave(torch.arange(len(lists)), torch.tensor([len(ids) for ids in lists]))
    ids = torch.tensor(list(chain.from_iterable(lists)), dtype=torch.long)
    return rows.to(device), ids.to(device)


def make_generator(seed: int | None, fallback_seed: int) -> torch.Generator:
    """A request's own RNG: its tokens then depend on its seed alone, not on its batch-mates."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(fallback_seed if seed is None else seed)
    return generator


class Sampler:
    """Penalties, then greedy argmax or temperature / top_k / top_p / min_p sampling.

    Random rows are drawn by inverse CDF: one uniform per row per step from the row's own
    generator, located in the cumulative sum of the row's filtered probabilities taken in
    token-id order. Every cut is a probability threshold derived from the row's values alone,
    so a seeded request samples the same tokens whatever batch it is in and at any row.
    """

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
        params = [row.params for row in rows]
        raw = logits
        logits = self.apply_penalties(logits, rows)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not random_rows:
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
            greedy_rows = [i for i, p in enumerate(params) if p.greedy]
            if greedy_rows:
                token_ids[greedy_rows] = logits[greedy_rows].argmax(dim=-1)
            token_ids[random_rows] = self._sample_random(logits[random_rows], [rows[i] for i in random_rows])
        ids = token_ids.tolist()
        logprobs = self._logprobs(raw, token_ids, params)
        return [SampledToken(t, *logprobs.get(i, (None, None))) for i, t in enumerate(ids)]

    @staticmethod
    def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """HF repetition penalty over prompt + output, OpenAI presence/frequency over output."""
        idx = [i for i, r in enumerate(rows)
               if r.params.repetition_penalty != 1.0 or r.params.presence_penalty != 0.0
               or r.params.frequency_penalty != 0.0]
        if not idx:
            return logits
        sub = [rows[i] for i in idx]
        dev = logits.device
        x = logits[idx]
        counts = torch.zeros_like(x)
        out_rows, out_ids = _flatten([r.output_token_ids for r in sub], dev)
        counts.index_put_((out_rows, out_ids), torch.ones(len(out_ids), device=dev), accumulate=True)

        rep = torch.tensor([r.params.repetition_penalty for r in sub], device=dev).unsqueeze(1)
        if (rep != 1.0).any():
            seen = counts > 0
            seen[_flatten([r.prompt_token_ids for r in sub], dev)] = True
            x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        freq = torch.tensor([r.params.frequency_penalty for r in sub], device=dev).unsqueeze(1)
        presence = torch.tensor([r.params.presence_penalty for r in sub], device=dev).unsqueeze(1)
        x = x - freq * counts - presence * (counts > 0)
        logits = logits.clone()
        logits[idx] = x
        return logits

    def _sample_random(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        temperature = torch.tensor([r.params.temperature for r in rows], device=logits.device).unsqueeze(1)
        probs = torch.softmax(logits / temperature, dim=-1)
        floor = self._cutoffs(probs, [r.params for r in rows])
        if floor is not None:
            probs = probs.mul_(probs >= floor.unsqueeze(1))
        cdf = probs.cumsum(dim=-1, dtype=torch.float64)
        u = torch.cat([torch.rand(1, generator=r.generator, dtype=torch.float64) for r in rows]).to(cdf.device)
        picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        return picked.clamp_(max=probs.shape[1] - 1)

    @staticmethod
    def _cutoffs(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor | None:
        """Per-row smallest probability that survives top_k, then top_p, then min_p.

        The thresholds are values of the row's sorted probabilities, which do not depend on
        how ties are ordered or on how many candidates were fetched: that keeps rows
        independent of the batch.
        """
        (n, vocab), dev = probs.shape, probs.device
        top_k = torch.tensor([p.top_k if p.top_k < vocab else 0 for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev)
        min_p = torch.tensor([p.min_p for p in params], device=dev)
        truncated = (top_k > 0) | (top_p < 1.0)
        if not truncated.any() and not (min_p > 0).any():
            return None
        floor = min_p * probs.amax(dim=-1) if (min_p > 0).any() else torch.zeros(n, device=dev)
        todo = truncated.nonzero().squeeze(1)
        k = max(_NUCLEUS_GUESS, int(top_k.max()))
        while todo.numel():
            k = min(k, vocab)
            vals = probs[todo].topk(k, dim=-1).values
            row_k, row_p = top_k[todo], top_p[todo].unsqueeze(1)
            allowed = torch.arange(k, device=dev) < torch.where(row_k > 0, row_k, k).unsqueeze(1)
            mass = vals * allowed
            mass = torch.where((row_k > 0).unsqueeze(1), mass / mass.sum(dim=-1, keepdim=True), mass)
            before = mass.cumsum(dim=-1) - mass
            kept = (allowed & ((before < row_p) | (row_p >= 1.0))).sum(dim=-1)
            done = (row_k > 0) | (kept < k) | (k == vocab)
            cut = vals.gather(1, (kept - 1).unsqueeze(1)).squeeze(1)
            floor[todo[done]] = torch.maximum(floor[todo[done]], cut[done])
            todo = todo[~done]
            k *= 16
        return floor

    @staticmethod
    def _logprobs(logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]
                  ) -> dict[int, tuple[float, list[tuple[int, float]]]]:
        """Log-probabilities under the model's raw distribution, as vLLM reports by default."""
        idx = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not idx:
            return {}
        logprobs = torch.log_softmax(logits[idx], dim=-1)
        chosen = logprobs.gather(1, token_ids[idx].unsqueeze(1)).squeeze(1).tolist()
        width = max(params[i].logprobs for i in idx)
        top_vals, top_ids = logprobs.topk(width, dim=-1)
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        return {i: (chosen[j], list(zip(top_ids[j][:params[i].logprobs], top_vals[j][:params[i].logprobs])))
                for j, i in enumerate(idx)}
