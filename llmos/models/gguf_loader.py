"""GGUF files (llama.cpp's format): metadata to ModelConfig, quantized tensors to float32.

llama.cpp renames every tensor and, for the llama architecture, permutes the rows of
q_proj and k_proj so its rope kernel can rotate adjacent pairs; we rename back and undo
the permutation, so the weights equal the Hugging Face originals and one engine runs both.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize

from llmos.errors import ModelLoadError
from llmos.models.config import ModelConfig
from llmos.models.hf_loader import check_weight_shapes
from llmos.models.packed import PackedTensor
from llmos.models.tokenizer import Tokenizer

ARCHITECTURES = ("llama", "mistral", "qwen2")
PACKED_TYPES = {Q.Q4_0: "q4_0", Q.Q4_1: "q4_1", Q.Q8_0: "q8_0",   # kept packed; the engine has kernels for these
                Q.Q4_K: "q4_k", Q.Q5_K: "q5_k", Q.Q6_K: "q6_k"}
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
TENSOR_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)

_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"   # Llama 3.1+ per-frequency rope factors, precomputed


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None if it is not one of a Llama-family model's."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


class GGUFCheckpoint:
    """A GGUF file opened and checked: config and tokenizer now, tensors on `weights()`."""

    def __init__(self, path: Path):
        self.path = path
        self._reader = _open(path)
        try:
            self.metadata = {k: _value(f) for k, f in self._reader.fields.items() if not k.startswith("GGUF.")}
        except Exception as e:   # a garbled value type or string surfaces only when read
            raise ModelLoadError(f"{path}: corrupt GGUF metadata: {type(e).__name__}: {e}") from None
        arch = self.metadata.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise ModelLoadError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
        self._tensors = {t.name: t for t in self._reader.tensors}
        size = path.stat().st_size
        for t in self._reader.tensors:
            if t.tensor_type not in TENSOR_TYPES:
                raise ModelLoadError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which llmos "
                                     f"cannot dequantize (supported: {', '.join(q.name for q in TENSOR_TYPES)})")
            if t.data_offset + t.n_bytes > size:
                raise ModelLoadError(f"{path}: truncated file: tensor {t.name} ends at byte "
                                     f"{t.data_offset + t.n_bytes}, the file has {size}")
        self.tokenizer = Tokenizer.from_gguf(self.metadata, str(path))
        try:
            self.config = self._config(arch)
        except (TypeError, ValueError) as e:   # a value of the wrong type, e.g. a string where a float goes
            raise ModelLoadError(f"{path}: malformed metadata: {e}") from None
        shapes = {hf_name(n) or n: tuple(int(d) for d in reversed(t.shape)) for n, t in self._tensors.items()
                  if n != _ROPE_FREQS}
        check_weight_shapes(shapes, self.config, str(path))

    def _config(self, arch: str) -> ModelConfig:
        def count(key: str, default: Any = None) -> int:
            value = self.metadata.get(f"{arch}.{key}", default)
            if value is None:
                raise ModelLoadError(f"{self.path}: missing required metadata key {arch}.{key}")
            if isinstance(value, list) and len(set(value)) == 1:   # a per-layer list with one value throughout
                value = value[0]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelLoadError(f"{self.path}: {arch}.{key} must be a positive integer, got {value!r}")
            return value

        hidden, heads = count("embedding_length"), count("attention.head_count")
        kv_heads = count("attention.head_count_kv", heads)
        if heads % kv_heads:
            raise ModelLoadError(f"{self.path}: {arch}.attention.head_count_kv {kv_heads} does not divide "
                                 f"{arch}.attention.head_count {heads}")
        if f"{arch}.attention.key_length" in self.metadata:
            head_dim = count("attention.key_length")
        elif hidden % heads:
            raise ModelLoadError(f"{self.path}: {arch}.attention.head_count {heads} does not divide "
                                 f"{arch}.embedding_length {hidden}")
        else:
            head_dim = hidden // heads
        rope_dim = self.metadata.get(f"{arch}.rope.dimension_count", head_dim)
        if rope_dim != head_dim:
            raise ModelLoadError(f"{self.path}: partial rotary embedding ({arch}.rope.dimension_count {rope_dim} "
                                 f"< head dim {head_dim}) is not supported")
        theta = float(self.metadata.get(f"{arch}.rope.freq_base", 10000.0))
        vocab = self.metadata.get(f"{arch}.vocab_size", len(self.metadata.get("tokenizer.ggml.tokens") or []))
        return ModelConfig(
            architecture=arch, vocab_size=int(vocab), hidden_size=hidden,
            intermediate_size=count("feed_forward_length"), num_layers=count("block_count"),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(self.metadata.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=theta, rope_scaling=self._rope_scaling(arch, theta, head_dim),
            max_position_embeddings=count("context_length"),
            tie_word_embeddings="output.weight" not in self._tensors,
            attention_bias="blk.0.attn_q.bias" in self._tensors,
            bos_token_id=self.tokenizer.bos_token_id, eos_token_ids=self.tokenizer.eos_token_ids)

    def _rope_scaling(self, arch: str, theta: float, head_dim: int) -> dict | None:
        """The Hugging Face rope_scaling dict this file's rope.scaling.* keys (or rope_freqs) describe."""
        kind = self.metadata.get(f"{arch}.rope.scaling.type", "none")
        factor = float(self.metadata.get(f"{arch}.rope.scaling.factor", 1.0))
        if kind == "linear":
            return {"rope_type": "linear", "factor": factor}
        if kind == "yarn":
            scaling = {"rope_type": "yarn", "factor": factor}
            if f"{arch}.rope.scaling.original_context_length" in self.metadata:
                scaling["original_max_position_embeddings"] = int(
                    self.metadata[f"{arch}.rope.scaling.original_context_length"])
            if f"{arch}.rope.scaling.attn_factor" in self.metadata:
                scaling["attention_factor"] = float(self.metadata[f"{arch}.rope.scaling.attn_factor"])
            return scaling
        if kind != "none":
            raise ModelLoadError(f"{self.path}: unsupported rope scaling type {kind!r}")
        if _ROPE_FREQS in self._tensors:
            return _llama3_rope_scaling(self.path, self._dequantize(self._tensors[_ROPE_FREQS]), theta, head_dim)
        return None

    def weights(self, packed: bool = False) -> dict[str, torch.Tensor | PackedTensor]:
        """Every tensor under its HF name, q/k rows back in HF order: float32, or with `packed`
        the matrices of a type the engine has kernels for as their GGUF blocks (PackedTensor)."""
        c = self.config
        weights = {}
        for name, t in self._tensors.items():
            if name == _ROPE_FREQS:
                continue
            if packed and t.tensor_type in PACKED_TYPES and len(t.shape) == 2:
                shape = tuple(int(d) for d in reversed(t.shape))
                w = PackedTensor(torch.from_numpy(np.array(t.data, dtype=np.uint8)), PACKED_TYPES[t.tensor_type], shape)
            else:
                w = self._dequantize(t)
            if c.architecture != "qwen2" and (".attn_q." in name or ".attn_k." in name):
                w = _unpermute(w, c.num_heads if ".attn_q." in name else c.num_kv_heads)
            weights[hf_name(name)] = w
        return weights

    def quantized_names(self) -> set[str]:
        """HF names of the matrices the file holds quantized (in any GGUF block format)."""
        return {hf_name(n) for n, t in self._tensors.items()
                if n != _ROPE_FREQS and t.tensor_type not in FLOAT_TYPES and len(t.shape) == 2}

    def _dequantize(self, t) -> torch.Tensor:
        w = dequantize(t.data, t.tensor_type)
        if not w.flags.writeable or not w.flags.c_contiguous:   # F32 comes back as a view of the file
            w = np.array(w, dtype=np.float32)
        return torch.from_numpy(w.astype(np.float32, copy=False)).reshape(tuple(int(d) for d in reversed(t.shape)))


def _unpermute(w: torch.Tensor | PackedTensor, n_head: int) -> torch.Tensor | PackedTensor:
    """Invert llama.cpp's convert_hf_to_gguf permute(), which moved rows (head, 2, d/2) to (head, d/2, 2)."""
    rows = w.shape[0]
    if isinstance(w, PackedTensor):   # whole rows move; a block never spans two rows
        order = torch.arange(rows).reshape(n_head, rows // n_head // 2, 2).transpose(1, 2).reshape(rows)
        return w.permute_rows(order)
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _llama3_rope_scaling(path: Path, factors: torch.Tensor, theta: float, head_dim: int) -> dict | None:
    """Recover Llama 3's rope_scaling from the factors llama.cpp precomputed from it.

    Every Llama 3.1-3.3 model uses low/high frequency factors 1 and 4 over an 8192-token
    original context; only `factor` varies. We rebuild the factors from those values and
    accept them only if they match, so an unknown variant fails loudly, not silently.
    """
    factor = float(factors.max())
    if factor == 1.0:
        return None
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    expected = torch.where(wavelen < 8192 / 4.0, 1.0,
                           torch.where(wavelen > 8192 / 1.0, factor, 1 / ((1 - smooth) / factor + smooth)))
    if factors.shape != expected.shape or not torch.allclose(factors.double(), expected, rtol=1e-4):
        raise ModelLoadError(f"{path}: rope_freqs.weight does not match Llama 3 rope scaling; not supported")
    return scaling


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise ModelLoadError(f"{path}: file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(path)
    except Exception as e:   # the reader fails deep inside numpy on short or garbled files
        raise ModelLoadError(f"{path}: truncated or corrupt GGUF file ({path.stat().st_size} bytes): "
                             f"{type(e).__name__}: {e}") from None


def _value(field) -> Any:
    """A metadata value as plain Python; float32 values at the precision they were written with."""
    value = field.contents()
    if field.types and field.types[0] == GGUFValueType.FLOAT32:
        return float(str(np.float32(value)))
    return value
