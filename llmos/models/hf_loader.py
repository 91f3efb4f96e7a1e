"""Hugging Face model directories: config.json, *.safetensors and tokenizer.json.

Hugging Face tensor names are llmos's canonical weight names, so this file also says
which tensors (and shapes) a Llama-family model must have; every loader checks against it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from llmos.errors import ModelLoadError
from llmos.models.config import ModelConfig
from llmos.models.tokenizer import Tokenizer

_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def hf_weight_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a model of this shape has, by its Hugging Face name."""
    h, i, q, kv = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    for n in range(c.num_layers):
        p = f"model.layers.{n}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i)}
        if c.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
    return shapes


def check_weight_shapes(shapes: dict[str, tuple[int, ...]], config: ModelConfig, source: str) -> None:
    """Raise unless `shapes` holds exactly the tensors `config` implies, each of the implied shape."""
    want = hf_weight_shapes(config)
    missing = sorted(set(want) - set(shapes))
    if missing:
        raise ModelLoadError(f"{source}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                          if len(missing) > 1 else ""))
    extra = sorted(set(shapes) - set(want))
    if extra:
        raise ModelLoadError(f"{source}: unexpected tensor {extra[0]} for a {config.architecture} model")
    for name, shape in want.items():
        if tuple(shapes[name]) != shape:
            raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(shapes[name])}, "
                                 f"but the config implies {shape}")


class HFCheckpoint:
    """A Hugging Face model directory opened for loading; weights stay memory-mapped where they can."""

    def __init__(self, path: Path):
        self.path = path
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: no config.json; not a Hugging Face model directory")
        cfg = _read_json(path / "config.json")
        self.files = self._weight_files()
        eos = _read_json(path / "generation_config.json").get("eos_token_id", cfg.get("eos_token_id"))
        tok_cfg = _read_json(path / "tokenizer_config.json")
        template = tok_cfg.get("chat_template")
        if isinstance(template, list):   # named templates; the "default" one is for chat
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").is_file():   # where transformers 5 saves it
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)]
        self.tokenizer = Tokenizer.from_hf(path / "tokenizer.json", tok_cfg, eos_ids, template)
        self.config = self._config(cfg)

    def _config(self, cfg: dict) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((_ARCHITECTURES[a] for a in archs if a in _ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(f"{self.path / 'config.json'}: unsupported architecture "
                                 f"{archs or cfg.get('model_type')} (supported: {', '.join(_ARCHITECTURES)})")
        if cfg.get("mlp_bias") or (arch != "qwen2" and cfg.get("attention_bias")):
            raise ModelLoadError(f"{self.path / 'config.json'}: attention_bias/mlp_bias (o_proj or MLP biases) "
                                 f"are not supported")

        def need(key: str) -> int:
            value = cfg.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelLoadError(f"{self.path / 'config.json'}: {key} must be a positive integer, got {value!r}")
            return value

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        head_dim = cfg.get("head_dim") or hidden // heads
        if not cfg.get("head_dim") and hidden % heads:
            raise ModelLoadError(f"{self.path / 'config.json'}: num_attention_heads {heads} does not divide "
                                 f"hidden_size {hidden}")
        kv_heads = cfg.get("num_key_value_heads") or heads
        if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
            raise ModelLoadError(f"{self.path / 'config.json'}: num_key_value_heads {kv_heads} does not divide "
                                 f"num_attention_heads {heads}")
        # transformers 5 writes rope_parameters; older files rope_theta + rope_scaling ("type" or "rope_type")
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope = rope or dict(cfg.get("rope_scaling") or {})
        if "type" in rope:
            rope.setdefault("rope_type", rope.pop("type"))
        return ModelConfig(
            architecture=arch, vocab_size=need("vocab_size"), hidden_size=hidden,
            intermediate_size=need("intermediate_size"), num_layers=need("num_hidden_layers"),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            rope_scaling=rope if rope.get("rope_type", "default") != "default" else None,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), attention_bias=arch == "qwen2",
            bos_token_id=self.tokenizer.bos_token_id, eos_token_ids=self.tokenizer.eos_token_ids)

    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map") or {}
            files = [self.path / f for f in dict.fromkeys(weight_map.values())]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise ModelLoadError(f"{index}: shard {missing[0].name} is missing")
            if files:
                return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{self.path}: no *.safetensors weights (only safetensors files are supported)")
        return files

    def weights(self) -> dict[str, torch.Tensor]:
        """float32 tensors by HF name; float32 files are used in place (mmap), others converted."""
        weights = {}
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    for name in st.keys():
                        if not name.endswith("rotary_emb.inv_freq"):
                            weights[name] = st.get_tensor(name)
            except Exception as e:   # safetensors raises its own error types for bad headers/sizes
                raise ModelLoadError(f"{f}: cannot read safetensors file: {e}") from None
        if self.config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)   # some checkpoints store the tied copy too
        check_weight_shapes({k: tuple(v.shape) for k, v in weights.items()}, self.config, str(self.path))
        return {k: v if v.dtype == torch.float32 else v.float() for k, v in weights.items()}


def _read_json(path: Path) -> dict:
    """A JSON file's object, {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not valid JSON: {e}") from None
