"""LoRA adapters from disk: PEFT directories (adapter_config.json + adapter_model.safetensors)
and llama.cpp GGUF LoRA files, checked against the base model they are meant for.

Both become the same plain data: per (layer, target module) the low-rank pair A [r, in],
B [out, r] in Hugging Face's orientation and the scale the product is multiplied by, so
the engine has one path for both. Everything that can be wrong with an adapter is found
here, before any engine state changes: a missing or corrupt file, a target module the
engine cannot adapt, a rank over the limit, shapes that do not fit the base model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from llmos.errors import ModelLoadError
from llmos.models.config import ModelConfig
from llmos.models.gguf_loader import _open, _unpermute, _value

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_GGUF_TARGETS = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
                 "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}
_PEFT_TENSOR = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])\.weight")
_GGUF_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight\.lora_([ab])")
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class LoraPair:
    a: torch.Tensor      # [r, in]  float32
    b: torch.Tensor      # [out, r] float32
    scale: float         # the product B @ A is multiplied by this (alpha / r)

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoraCheckpoint:
    path: Path
    format: str                                  # "peft" | "gguf"
    alpha: float
    pairs: dict[tuple[int, str], LoraPair]       # (layer, target module) -> pair

    @property
    def rank(self) -> int:
        return max(p.rank for p in self.pairs.values())

    @property
    def targets(self) -> tuple[str, ...]:
        present = {t for _, t in self.pairs}
        return tuple(t for t in TARGETS if t in present)


def target_shape(config: ModelConfig, target: str) -> tuple[int, int]:
    """(out, in) of a target projection of the base model."""
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}[target]


def load_lora(path: str | Path, config: ModelConfig, max_rank: int = 64) -> LoraCheckpoint:
    """A PEFT adapter directory (or its adapter_model.safetensors) or a GGUF LoRA file,
    validated against `config`; raises ModelLoadError saying what is wrong and where."""
    try:
        path = Path(path).expanduser()
        if not path.exists():
            raise ModelLoadError(f"{path}: no such adapter file or directory")
        if path.is_file() and path.name == PEFT_WEIGHTS:
            path = path.parent
        if path.is_dir():
            ckpt = _read_peft(path)
        elif _is_gguf(path):
            ckpt = _read_gguf(path, config)
        else:
            raise ModelLoadError(f"{path}: not a LoRA adapter (expected a PEFT directory with {PEFT_CONFIG} and "
                                 f"{PEFT_WEIGHTS}, or a GGUF LoRA file)")
    except (OSError, ValueError) as e:   # unreadable, a special file, a NUL byte in the name
        raise ModelLoadError(f"{str(path)[:200]!r}: cannot read the adapter: {e}") from None
    _check(ckpt, config, max_rank)
    return ckpt


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# -- PEFT --------------------------------------------------------------------------------
def _read_peft(path: Path) -> LoraCheckpoint:
    cfg = _peft_config(path)
    weights = path / PEFT_WEIGHTS
    if not weights.is_file():
        other = sorted(p.name for p in path.glob("adapter_model.*"))
        raise ModelLoadError(f"{path}: no {PEFT_WEIGHTS}" + (f" (found {other[0]}; only safetensors is supported)"
                                                             if other else ""))
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for name in f.keys():
                layer, target, half = _peft_name(weights, name)
                halves.setdefault((layer, target), {})[half] = f.get_tensor(name).float()
    except ModelLoadError:
        raise
    except Exception as e:   # safetensors raises its own types for bad headers and short files
        raise ModelLoadError(f"{weights}: corrupt safetensors file: {e}") from None
    alpha = float(cfg.get("lora_alpha") or cfg.get("r") or 8)
    pairs = {}
    for (layer, target), h in sorted(halves.items()):
        if set(h) != {"A", "B"}:
            missing = "lora_B" if "A" in h else "lora_A"
            raise ModelLoadError(f"{weights}: layer {layer} {target} has no {missing} tensor")
        module = f"model.layers.{layer}.{_PARENT[target]}.{target}"
        r = h["A"].shape[0] if h["A"].dim() == 2 else 0
        want = _pattern(cfg.get("rank_pattern"), module, cfg.get("r"))
        if want is not None and r != want:
            raise ModelLoadError(f"{weights}: {module} has rank {r}, but {PEFT_CONFIG} says r={want}")
        a_m = float(_pattern(cfg.get("alpha_pattern"), module, alpha))
        scale = a_m / math.sqrt(r) if cfg.get("use_rslora") else a_m / max(r, 1)
        pairs[(layer, target)] = LoraPair(h["A"], h["B"], scale)
    return LoraCheckpoint(path, "peft", alpha, pairs)


def _peft_config(path: Path) -> dict:
    f = path / PEFT_CONFIG
    if not f.is_file():
        raise ModelLoadError(f"{path}: no {PEFT_CONFIG}; not a PEFT adapter directory")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{f}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{f}: expected a JSON object")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ModelLoadError(f"{f}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    unsupported = [(k, v) for k, v in (("use_dora", cfg.get("use_dora")), ("fan_in_fan_out", cfg.get("fan_in_fan_out")),
                                       ("lora_bias", cfg.get("lora_bias")),
                                       ("modules_to_save", cfg.get("modules_to_save")))
                   if v]
    if cfg.get("bias", "none") != "none":
        unsupported.append(("bias", cfg["bias"]))
    if unsupported:
        k, v = unsupported[0]
        raise ModelLoadError(f"{f}: {k}={v!r} is not supported (plain LoRA on {', '.join(TARGETS)} only)")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise ModelLoadError(f"{f}: {key} must be a positive number, got {v!r}")
    return cfg


def _peft_name(source: Path, name: str) -> tuple[int, str, str]:
    m = _PEFT_TENSOR.fullmatch(name)
    if m is not None and m.group(3) in TARGETS and _PARENT[m.group(3)] == m.group(2):
        return int(m.group(1)), m.group(3), m.group(4)
    module = re.sub(r"\.(lora_\w+|weight|bias)(\.\w+)*$", "", name).removeprefix("base_model.model.")
    raise ModelLoadError(f"{source}: unsupported target module {module} (tensor {name}); LoRA can adapt "
                         f"{', '.join(TARGETS)}")


def _pattern(patterns: dict | None, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key the module name ends with."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


# -- GGUF (llama.cpp's convert_lora_to_gguf) --------------------------------------------------
def _read_gguf(path: Path, config: ModelConfig) -> LoraCheckpoint:
    from gguf.quants import dequantize
    reader = _open(path)
    try:
        meta = {k: _value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as e:
        raise ModelLoadError(f"{path}: corrupt GGUF metadata: {type(e).__name__}: {e}") from None
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise ModelLoadError(f"{path}: not a LoRA adapter (general.type={meta.get('general.type')!r}, "
                             f"adapter.type={meta.get('adapter.type')!r}; expected 'adapter' and 'lora')")
    arch = meta.get("general.architecture")
    if arch is not None and arch != config.architecture:
        raise ModelLoadError(f"{path}: adapter for a {arch} model, but the base model is {config.architecture}")
    size = path.stat().st_size
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        m = _GGUF_TENSOR.fullmatch(t.name)
        if m is None or m.group(2) not in _GGUF_TARGETS:
            raise ModelLoadError(f"{path}: unsupported target module {t.name.split('.weight')[0]} (tensor "
                                 f"{t.name}); LoRA can adapt {', '.join(_GGUF_TARGETS)}")
        if t.data_offset + t.n_bytes > size:
            raise ModelLoadError(f"{path}: truncated file: tensor {t.name} ends past the end of the file")
        try:
            w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot read tensor {t.name} ({t.tensor_type.name}): {e}") from None
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        target = _GGUF_TARGETS[m.group(2)]
        if m.group(3) == "b" and target in ("q_proj", "k_proj") and config.architecture != "qwen2" and w.dim() == 2:
            # llama.cpp permutes q/k rows for its rope; for a LoRA that is B's rows
            heads = config.num_heads if target == "q_proj" else config.num_kv_heads
            if w.shape[0] % (2 * heads) == 0:
                w = _unpermute(w, heads)
        halves.setdefault((int(m.group(1)), target), {})[m.group(3)] = w
    alpha = float(meta.get("adapter.lora.alpha") or 0.0)
    pairs = {}
    for (layer, target), h in sorted(halves.items()):
        if set(h) != {"a", "b"}:
            raise ModelLoadError(f"{path}: layer {layer} {target} has only lora_{next(iter(h))}")
        r = h["a"].shape[0]
        pairs[(layer, target)] = LoraPair(h["a"], h["b"], alpha / r if alpha else 1.0)   # llama.cpp's rule
    return LoraCheckpoint(path, "gguf", alpha, pairs)


# -- the checks both formats share ------------------------------------------------------------
def _check(ckpt: LoraCheckpoint, config: ModelConfig, max_rank: int) -> None:
    if not ckpt.pairs:
        raise ModelLoadError(f"{ckpt.path}: the adapter holds no LoRA weights")
    for (layer, target), p in ckpt.pairs.items():
        where = f"{ckpt.path}: layer {layer} {target}"
        if layer >= config.num_layers:
            raise ModelLoadError(f"{where}: the base model has only {config.num_layers} layers")
        out, inp = target_shape(config, target)
        if p.a.dim() != 2 or p.b.dim() != 2 or p.a.shape[1] != inp or p.b.shape[0] != out \
                or p.a.shape[0] != p.b.shape[1]:
            raise ModelLoadError(f"{where}: lora_A {tuple(p.a.shape)} and lora_B {tuple(p.b.shape)} do not fit "
                                 f"the base model's {target} ({out} x {inp}): expected [r, {inp}] and [{out}, r]")
        if not 0 < p.rank <= max_rank:
            raise ModelLoadError(f"{where}: rank {p.rank} is over the limit of {max_rank} (max_lora_rank)")
        if not (torch.isfinite(p.a).all() and torch.isfinite(p.b).all()):
            raise ModelLoadError(f"{where}: holds NaN or infinite values")
