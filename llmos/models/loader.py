"""One entry point from a model name or path to config, float32 weights and tokenizer.

Dequantizing a GGUF costs seconds (most of it parsing the metadata, then numpy
dequantization), so the result is kept as a safetensors file that later loads
memory-map: the second start of the same model is an mmap, not a decode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmos.config import llmos_home
from llmos.models.config import ModelConfig
from llmos.models.gguf_loader import GGUFCheckpoint
from llmos.models.hf_loader import HFCheckpoint, check_weight_shapes
from llmos.models.packed import PackedTensor
from llmos.models.store import ModelStore
from llmos.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CACHE_FORMAT = "2"   # bump when what the cache holds (names, layout, unpermute) changes


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor | PackedTensor]   # float32 (or packed, when asked), Hugging Face names
    tokenizer: Tokenizer
    path: Path
    name: str
    quantized: set[str] = field(default_factory=set)   # matrices the file holds quantized


def load_model(name_or_path: str, cache: bool = True, packed: bool = False) -> LoadedModel:
    """Load a store name, a .gguf file or a Hugging Face directory; GGUFs go through the weight
    cache, or with `packed` keep their Q4_0 / Q4_1 / Q8_0 / K-quant matrices as the file has them."""
    store = ModelStore()
    path = store.resolve(name_or_path)
    name = (path.relative_to(store.root).parts[0] if store.root in path.parents
            else path.stem if path.is_file() else path.name)
    if path.is_dir():
        ckpt = HFCheckpoint(path)
        return LoadedModel(ckpt.config, ckpt.weights(), ckpt.tokenizer, path, name)
    weight_cache = WeightCache(path, packed=packed)
    hit = weight_cache.load() if cache else None
    if hit is None:
        ckpt = GGUFCheckpoint(path)
        hit = ckpt.config, ckpt.weights(packed=packed), ckpt.tokenizer, ckpt.quantized_names() if packed else set()
        if cache:
            weight_cache.store(*hit)
    return LoadedModel(hit[0], hit[1], hit[2], path, name, hit[3])


class WeightCache:
    """A GGUF's dequantized weights (or, `packed`, its Q4_0/Q4_1/Q8_0 matrices as the file's
    bytes), config and tokenizer in one safetensors file: opening a GGUF parses all its
    metadata (seconds), the cache is an mmap.

    The key is the GGUF's absolute path, size and mtime, so an edited or replaced file
    never meets a stale cache; anything wrong with a cache file means it is rebuilt.
    """

    def __init__(self, source: Path, root: Path | None = None, packed: bool = False):
        self.packed = packed
        self.source = source.resolve()
        st = self.source.stat()
        where = hashlib.sha256(str(self.source).encode()).hexdigest()[:8]
        what = hashlib.sha256(f"{st.st_size}|{st.st_mtime_ns}|{CACHE_FORMAT}".encode()).hexdigest()[:12]
        self.root = root or llmos_home() / "cache"
        self._prefix = f"{self.source.stem}-{where}-" + ("packed-" if packed else "")
        self.path = self.root / f"{self._prefix}{what}.safetensors"

    def load(self) -> tuple[ModelConfig, dict[str, torch.Tensor | PackedTensor], Tokenizer, set[str]] | None:
        """The cached entry, memory-mapped, or None if there is none or it is unusable."""
        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != CACHE_FORMAT or meta.get("source") != str(self.source):
                    raise ValueError("written for another source or format")
                config = ModelConfig(**json.loads(meta["config"]))
                names = list(f.keys())
                packed = json.loads(meta.get("packed", "{}"))    # name -> [qtype, rows, cols]
                if any(f.get_slice(k).get_dtype() != ("U8" if k in packed else "F32") for k in names):
                    raise ValueError("holds tensors of unexpected types")
                shapes = {k: tuple(packed[k][1:]) if k in packed else tuple(f.get_slice(k).get_shape()) for k in names}
                check_weight_shapes(shapes, config, str(self.path))
                tokenizer = Tokenizer.from_json(meta["tokenizer"])
                weights = {k: PackedTensor(f.get_tensor(k), packed[k][0], shapes[k]) if k in packed else f.get_tensor(k)
                           for k in names}
                quantized = set(json.loads(meta.get("quantized", "[]")))
        except Exception as e:   # any failure (bad header, short file, wrong set) means: rebuild it
            log.warning("weight cache %s is unusable (%s); rebuilding it", self.path, e)
            self.path.unlink(missing_ok=True)
            return None
        return config, weights, tokenizer, quantized

    def store(self, config: ModelConfig, weights: dict[str, torch.Tensor | PackedTensor], tokenizer: Tokenizer,
              quantized: set[str] = frozenset()) -> None:
        """Write atomically (temp file, then rename) and drop this source's older entries."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f"{self._prefix}*.safetensors"):
                if ("-packed-" in stale.name) == self.packed:
                    stale.unlink(missing_ok=True)
            packed = {k: [w.qtype, *w.shape] for k, w in weights.items() if isinstance(w, PackedTensor)}
            tensors = {k: w.data if isinstance(w, PackedTensor) else w for k, w in weights.items()}
            save_file(tensors, str(tmp), metadata={"format": CACHE_FORMAT, "source": str(self.source),
                                                   "config": json.dumps(asdict(config)),
                                                   "tokenizer": tokenizer.to_json(), "packed": json.dumps(packed),
                                                   "quantized": json.dumps(sorted(quantized))})
            os.replace(tmp, self.path)
        except OSError as e:   # a full disk or read-only home costs speed next time, not this load
            log.warning("cannot write weight cache %s: %s", self.path, e)
            tmp.unlink(missing_ok=True)


def to_transformers(loaded: LoadedModel, attn_implementation: str = "sdpa"):
    """transformers' LlamaForCausalLM holding the very weights llmos runs: the reference the
    tests compare tokens against and the baseline the benchmarks compare speed against.
    Needs the `transformers` package (a test dependency, not a runtime one)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = loaded.config
    if c.architecture not in ("llama", "mistral") or c.attention_bias:
        raise ValueError(f"to_transformers covers Llama-shaped models, not {c.architecture!r}")
    hc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                     num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                     rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
                     max_position_embeddings=c.max_position_embeddings,
                     tie_word_embeddings=c.tie_word_embeddings, attn_implementation=attn_implementation)
    model = LlamaForCausalLM(hc).eval()
    missing, unexpected = model.load_state_dict(loaded.weights, strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise ValueError(f"weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model
