"""Shared fixtures: the real default model, fetched into the store once, and its HF twin."""

from __future__ import annotations

import os

import llmos  # noqa: F401  (first, so its OpenMP settings apply before torch starts)
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def default_model_path():
    from llmos.models.store import ModelStore
    return ModelStore().pull("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def loaded_default(default_model_path):
    from llmos.models.loader import load_model
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def hf_reference(loaded_default):
    """transformers' LlamaForCausalLM holding exactly the weights llmos runs (the loader's
    tests check those equal what transformers reads from the GGUF itself)."""
    from llmos.models.loader import to_transformers
    return to_transformers(loaded_default, attn_implementation="eager")


class GreedyReference:
    """Greedy continuation by transformers, one prompt alone, with the top-2 logit gap at
    every position so a divergence can be told apart from a numerical near-tie."""

    def __init__(self, model) -> None:
        self.model = model
        self.cache: dict[tuple, tuple[list[int], list[float]]] = {}

    @torch.inference_mode()
    def __call__(self, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:
        key = (tuple(prompt_ids), n)
        if key not in self.cache:
            from transformers import DynamicCache
            cache = DynamicCache()
            ids = torch.tensor([prompt_ids])
            tokens, gaps = [], []
            for _ in range(n):
                logits = self.model(ids, past_key_values=cache, use_cache=True).logits[0, -1].float()
                top = torch.topk(logits, 2)
                tokens.append(int(top.indices[0]))
                gaps.append(float(top.values[0] - top.values[1]))
                ids = top.indices[:1].view(1, 1)
            self.cache[key] = (tokens, gaps)
        return self.cache[key]


@pytest.fixture(scope="session")
def greedy_reference(hf_reference):
    return GreedyReference(hf_reference)


def assert_matches_reference(got: list[int], ref: list[int], gaps: list[float], tol: float = 1e-3) -> None:
    """Token-for-token equality, except that after a position where the reference's top two
    logits are within `tol` either choice is right (and what follows may differ)."""
    for i, (a, b) in enumerate(zip(got, ref)):
        if a != b:
            assert gaps[i] < tol, f"diverged at token {i}: got {a}, reference {b}, top-2 gap {gaps[i]:.2e}"
            return
    assert len(got) == len(ref), f"got {len(got)} tokens, reference {len(ref)}"
