"""Tiny random Llama, Qwen2 and Mistral models written by transformers: llmos' forward pass
and paged attention give the tokens transformers gives, alone and batched."""

from __future__ import annotations

import pytest
import torch

from conftest import GreedyReference, assert_matches_reference
from llmos import LLM, SamplingParams
from llmos.engine import paged_attention


def _tiny(kind: str, path):
    import transformers as tf
    common = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, rope_theta=50000.0))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=True))
        for layer in model.model.layers:   # random, visibly non-zero q/k/v biases
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    else:
        model = tf.MistralForCausalLM(tf.MistralConfig(**common))
    model.eval().save_pretrained(path)
    _write_tokenizer(path)
    return model


def _write_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    vocab = {chr(i + 33) if i < 90 else f"t{i}": i for i in range(512)}
    vocab.update({"<s>": 1, "</s>": 2})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_tiny_model_matches_transformers(kind, tmp_path):
    hf = _tiny(kind, tmp_path)
    ref = GreedyReference(hf)
    llm = LLM(model=str(tmp_path), kv_cache_memory="16MiB", block_size=4, max_num_batched_tokens=32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (1, 3, 7, 12, 40, 65)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for p, out in zip(prompts, outs):
        tokens, gaps = ref(p, 20)
        assert_matches_reference(out.token_ids, tokens, gaps)


def test_kernel_matches_pytorch_reference():
    assert paged_attention.kernel_available(), "the C++ paged attention kernel should build on this machine"
    g = torch.Generator().manual_seed(0)
    B, H, KVH, D, bs, nb = 7, 9, 3, 64, 16, 64
    k = torch.randn(nb * bs, KVH, D, generator=g)
    v = torch.randn(nb * bs, KVH, D, generator=g)
    tables = torch.randperm(nb, generator=g)[:B * 6].view(B, 6)
    lens = torch.tensor([1, 5, 16, 17, 50, 96, 33])
    q = torch.randn(B, H, D, generator=g)
    fast = paged_attention.paged_decode_attention(q, k, v, tables, lens, bs, D ** -0.5)
    slow = paged_attention._paged_decode_torch(q, k, v, tables, lens, bs, D ** -0.5)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
