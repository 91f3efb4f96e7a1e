"""Engine settings as one plain dataclass, with memory sizes given as text ("1GiB")."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from llmos.errors import InvalidRequestError
from llmos.validate import integer, number

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
}


def parse_size(value: int | float | str, name: str = "size") -> int:
    """Bytes from an int or a string such as "512MiB", "1GiB", "2GB"."""
    if isinstance(value, bool):
        raise InvalidRequestError(f"{name}: expected a size such as '1GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise InvalidRequestError(f"{name}: must be positive, got {value!r}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidRequestError(f"{name}: expected a size such as '1GiB' or '512MB', got {value!r}")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise InvalidRequestError(f"{name}: must be positive, got {value!r}")
    return n


def llmos_home() -> Path:
    """Root of the model store and caches: $LLMOS_HOME, else ~/.llmos."""
    return Path(os.environ.get("LLMOS_HOME") or Path.home() / ".llmos").expanduser()


@dataclass
class EngineConfig:
    model: str = "smollm2-135m"
    kv_cache_memory: int | str = "1GiB"
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    device: str = "auto"
    dtype: str = "float32"
    max_model_len: int | None = None
    # Weights also kept in this dtype for steps of at most 4 tokens (memory-bound decode):
    # about twice the single-stream speed, but tokens then depend on the batch size.
    decode_dtype: str | None = None
    # Quantized weights: "auto" keeps a GGUF's Q4_0/Q4_1/Q8_0 matrices packed and multiplies
    # them in place where that measures faster (small steps), "packed" always, "float32"
    # dequantizes them at load (the reference path). `quantization` packs a float model's
    # matrices at load. `packed_activations`: float32 multiplies the packed weights with exact
    # activations (the same tokens as the float32 path, whatever the batch), int8 quantizes
    # the activations for integer dot products as llama.cpp does (faster for one stream;
    # tokens then depend slightly on which path a step takes).
    compute: str = "auto"
    quantization: str | None = None
    packed_activations: str = "float32"
    seed: int = 0
    num_threads: int | None = None
    # Structured output: bounds put on JSON-schema numbers and strings that have none, so a
    # sensible max_tokens always ends in valid JSON.
    json_max_digits: int = 15
    json_max_string_length: int = 256
    # kernel
    scheduling_policy: str = "fcfs"          # fcfs | priority | rr | fair
    preemption_mode: str = "auto"            # auto | swap | recompute
    swap_space: int | str = "1GiB"           # host memory for swapped-out KV; a disk directory beyond it
    swap_dir: str | None = None
    # host memory that keeps cached prefix blocks the pool had to reuse (an idle conversation's
    # or agent's history), so they are copied back rather than prefilled again; 0 turns it off
    prefix_swap_space: int | str = "256MiB"
    aging_rate: float = 0.1                  # priority levels gained per second of waiting
    rr_quantum: int = 32                     # tokens a sequence runs before yielding (rr)
    max_waiting: int | None = 1024           # default bound on each tenant's waiting queue
    # LoRA adapters: memory their resident weights may hold, how many may be resident at
    # once (idle ones beyond either are evicted, least recently used first), largest rank
    adapter_memory: int | str = "1GiB"
    max_loaded_adapters: int = 32
    max_lora_rank: int = 64

    def __post_init__(self) -> None:
        self.kv_cache_memory = parse_size(self.kv_cache_memory, "kv_cache_memory")
        self.swap_space = parse_size(self.swap_space, "swap_space")
        self.adapter_memory = parse_size(self.adapter_memory, "adapter_memory")
        self.prefix_swap_space = (0 if self.prefix_swap_space in (0, "0")
                                  else parse_size(self.prefix_swap_space, "prefix_swap_space"))
        if self.scheduling_policy not in ("fcfs", "priority", "rr", "fair"):
            raise InvalidRequestError(
                f"scheduling_policy: must be fcfs, priority, rr or fair, got {self.scheduling_policy!r}")
        if self.preemption_mode not in ("auto", "swap", "recompute"):
            raise InvalidRequestError(
                f"preemption_mode: must be auto, swap or recompute, got {self.preemption_mode!r}")
        integer("rr_quantum", self.rr_quantum, 1)
        number("aging_rate", self.aging_rate, 0)
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "json_max_digits",
                     "json_max_string_length", "max_loaded_adapters", "max_lora_rank"):
            integer(name, getattr(self, name), 1)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise InvalidRequestError(f"dtype: must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.decode_dtype not in (None, "bfloat16", "float16"):
            raise InvalidRequestError(f"decode_dtype: must be bfloat16, float16 or unset, got {self.decode_dtype!r}")
        if self.compute not in ("auto", "packed", "float32"):
            raise InvalidRequestError(f"compute: must be auto, packed or float32, got {self.compute!r}")
        if self.quantization not in (None, "q8_0", "q4_0", "q4_1"):
            raise InvalidRequestError(f"quantization: must be q8_0, q4_0, q4_1 or unset, got {self.quantization!r}")
        if self.packed_activations not in ("int8", "float32"):
            raise InvalidRequestError(
                f"packed_activations: must be int8 or float32, got {self.packed_activations!r}")
        if self.device == "auto":
            import torch
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
