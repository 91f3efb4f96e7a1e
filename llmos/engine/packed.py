"""Weights kept packed in GGUF's block formats (Q4_0, Q4_1, Q8_0), multiplied in place.

A single stream's decode step reads every weight once and does two flops with each, so its
speed is the bytes it reads: a Q4_1 weight is 4.5 bits where float32 is 32. The kernels
(kernels/packed.cpp, built once per machine by torch's extension loader) read the packed
rows directly; large steps (prefill, big batches) are compute-bound, and there a layer's
weights are dequantized into a reused float32 buffer, still warm in cache, for the BLAS GEMM.
`ComputePlan` measures at load where that crossover lies on this machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from llmos.errors import ModelLoadError
from llmos.models.packed import GGML_TYPES, QK, QUANTIZABLE, PackedTensor

log = logging.getLogger("llmos.engine")

ISAS = {"auto": -1, "portable": 0, "avx2": 1, "avx512vnni": 2}

KERNEL_VERSION = 13       # bump when the kernels change what they cost
_lock = threading.Lock()
_module = None
_error: str | None = None


def kernels():
    """The compiled extension, built on first use; raises ModelLoadError where it cannot be."""
    global _module, _error
    with _lock:
        if _module is None and _error is None:
            try:
                from torch.utils.cpp_extension import load
                src = Path(__file__).with_name("kernels") / "packed.cpp"
                # No -march=native: the AVX2 code is compiled for AVX2 by attribute and chosen
                # at run time, so one build runs on any x86-64 and says what it may use.
                _module = load(name="llmos_packed", sources=[str(src)], extra_cflags=["-O3", "-fopenmp"],
                               extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:   # no compiler, no ninja, ...
                _error = f"{type(e).__name__}: {e}"
        if _module is None:
            raise ModelLoadError(f"the packed-weight kernels could not be built ({_error}); "
                                 "use compute='float32'")
        return _module


def kernels_available() -> bool:
    try:
        kernels()
        return True
    except ModelLoadError:
        return False


def quantize(w: torch.Tensor, qtype: str) -> PackedTensor:
    """A float matrix packed at load, with llama.cpp's reference rounding."""
    if qtype not in QUANTIZABLE:
        raise ModelLoadError(f"quantization: must be one of {', '.join(QUANTIZABLE)}, got {qtype!r}")
    if w.dim() != 2 or w.shape[1] % QK:
        raise ModelLoadError(f"cannot quantize a weight of shape {tuple(w.shape)} to {qtype}: "
                             f"its rows must hold a multiple of {QK} values")
    return PackedTensor(kernels().quantize(w.float().contiguous(), GGML_TYPES[qtype]), qtype, tuple(w.shape))


def dequantize(p: PackedTensor, out: torch.Tensor | None = None, isa: str = "auto") -> torch.Tensor:
    """float32 [rows, cols], into `out` (a reused buffer) when given."""
    return kernels().dequantize(p.data, GGML_TYPES[p.qtype], p.shape[0], p.shape[1], out, ISAS[isa])


def matmul(x: torch.Tensor, p: PackedTensor, int8: bool = True, isa: str = "auto") -> torch.Tensor:
    """x [M, cols] float32 @ p^T -> [M, rows], straight from the packed blocks; int8: the
    activations are quantized to 8 bits a block first (integer dot products), through the
    matrix's VNNI panels where it has them."""
    if int8 and p.panels is not None and isa == "auto":
        return kernels().matmul_panels(x, p.panels, GGML_TYPES[p.qtype], p.shape[0], p.shape[1])
    return kernels().matmul(x, p.data, GGML_TYPES[p.qtype], p.shape[0], p.shape[1], int8, ISAS[isa])


def gemm(x: torch.Tensor, p: PackedTensor, isa: str = "auto") -> torch.Tensor:
    """x [M, cols] float32 @ p^T -> [M, rows] for wide steps: each thread dequantizes a few
    dozen weight rows at a time into a tile in its L2 and multiplies it there with the BLAS
    GEMM that torch links (kernels().has_blas() says whether it does)."""
    return kernels().gemm(x, p.data, GGML_TYPES[p.qtype], p.shape[0], p.shape[1], ISAS[isa])


PANEL_TYPES = ("q4_0", "q4_1", "q8_0")


def panels_available() -> bool:
    return kernels_available() and kernels().has_avx512vnni()


def attach_panels(mats: list) -> int:
    """Gives each Q4_0/Q4_1/Q8_0 matrix its VNNI panels (16 rows interleaved, so one
    instruction advances 16 rows by 4 weights): what int8-activation steps multiply on
    AVX-512 VNNI CPUs. Kept beside the GGUF rows, which prefill and the exact variant read.
    Returns the bytes added."""
    added = 0
    for m in mats:
        if isinstance(m, PackedTensor) and m.qtype in PANEL_TYPES and m.panels is None:
            m.panels = kernels().repack_panels(m.data, GGML_TYPES[m.qtype], m.shape[0], m.shape[1])
            added += m.panels.numel()
    return added


def embedding(p: PackedTensor, ids: torch.Tensor) -> torch.Tensor:
    """The float32 rows of a packed embedding table for token ids."""
    return dequantize(p.rows(ids))


def decode_stack(hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int, eps: float,
                 layers: list[dict], kv_caches: list[tuple[torch.Tensor, torch.Tensor]]):
    """The C++ object that runs a decode step through every layer in one call (one parallel
    region, a spinning barrier between steps): where a small step's time goes is launching
    ops, not arithmetic."""
    stack = kernels().DecodeStack(hidden, inter, heads, kv_heads, head_dim, eps)
    for i, (layer, (k, v)) in enumerate(zip(layers, kv_caches)):
        mats = [layer[key] for key in ("qkv", "o", "gate_up", "down")]
        stack.add_layer(*(a for m in mats for a in (m.data, GGML_TYPES[m.qtype])),
                        layer["in_norm"], layer["post_norm"], layer["qkv_b"], k, v)
        if all(m.panels is not None for m in mats):
            stack.set_panels(i, *(m.panels for m in mats))
    return stack


@dataclass
class ComputePlan:
    """Which path each step takes. A pure decode step (every sequence adds one token, no
    adapter) runs in the C++ decode stack when it has at most `stack_max_tokens` tokens: the
    packed kernels below `gemm_min_tokens`, dequantized tiles through the BLAS GEMM from
    there. Other steps (prefill, adapters) go op by op: packed kernels up to
    `packed_max_tokens` tokens, float32 GEMMs on tiles dequantized per layer beyond.
    Chosen from timings made at load unless the setting forces one path. int8 activations
    are the packed kernels' (where a step is bound by reading weights); GEMM steps multiply
    float32 activations under either setting."""
    mode: str                                   # the setting: auto | packed | float32
    int8: bool = True                           # packed kernels quantize activations to 8 bits
    packed_max_tokens: int = 0
    stack_max_tokens: int = 0
    gemm_min_tokens: int = 0                    # 0: the stack never uses the GEMM
    weight_bytes: int = 0                       # the matrices as held in memory
    panel_bytes: int = 0                        # their VNNI panels beside them (int8 activations)
    panels: bool = False                        # the int8 kernels multiply every matrix's panels
    weight_types: dict[str, int] = field(default_factory=dict)   # type -> matrices of it
    timings: dict[int, dict[str, float]] = field(default_factory=dict)   # tokens -> path -> seconds
    steps: dict[str, int] = field(default_factory=lambda: {"stack": 0, "packed": 0, "float32": 0})

    PATHS = ("kernels", "gemm", "float32")

    def describe(self, mats: list) -> None:
        """Record what the matrices are held as, and their bytes."""
        self.weight_bytes = sum(m.nbytes if isinstance(m, PackedTensor) else m.numel() * m.element_size()
                                for m in mats)
        self.panel_bytes = sum(m.panels.numel() for m in mats if isinstance(m, PackedTensor) and m.panels is not None)
        self.panels = self.int8 and all(m.panels is not None for m in mats if isinstance(m, PackedTensor))
        self.weight_types = {}
        for m in mats:
            kind = m.qtype if isinstance(m, PackedTensor) else str(m.dtype).removeprefix("torch.")
            self.weight_types[kind] = self.weight_types.get(kind, 0) + 1

    def measure(self, step: Callable[[int, str], float], shapes: list, cache: Path | None = None,
                sizes=(1, 2, 4, 8, 16, 32, 64)) -> None:
        """Under auto: `step(tokens, path)` times one decode step of that many sequences on
        one path: "kernels" (the stack, packed kernels), "gemm" (the stack, tiles + BLAS),
        "float32" (op by op, tiles + BLAS). Paths are timed interleaved, best of 3, and a
        path must win by a margin where noise could decide. The result is kept in the
        `cache` file under what decides it (the matrices' shapes and types, the activations,
        threads, CPU), so a machine measures a model shape once."""
        if self.mode != "auto" or not self.weight_types.keys() - {"float32"}:
            return
        key = hashlib.sha256(json.dumps([KERNEL_VERSION, shapes, self.int8, torch.get_num_threads(),
                                         list(kernels().cpu_features()), torch.__version__]).encode()).hexdigest()[:16]
        known = _read_json(cache) if cache else {}
        got = known.get(key)
        if isinstance(got, dict) and all(isinstance(got.get(k), int) for k in
                                         ("packed_max_tokens", "stack_max_tokens", "gemm_min_tokens")):
            self.packed_max_tokens, self.stack_max_tokens, self.gemm_min_tokens = (
                got["packed_max_tokens"], got["stack_max_tokens"], got["gemm_min_tokens"])
            self.timings = {int(m): t for m, t in got.get("timings", {}).items()}
            if self.timings:      # decided again: how timings become a plan may have changed since
                self.decide(sizes)
            return
        t0, busy0 = time.perf_counter(), _others_cpu()
        gemm_ok = kernels().has_blas()
        kernel_losses = 0
        for m in sizes:
            paths = [p for p in self.PATHS if (p != "gemm" or gemm_ok) and (p != "kernels" or kernel_losses < 2)]
            t = {p: float("inf") for p in paths}
            for _ in range(3):                # interleaved, the best of each: a busy moment hits all
                for path in paths:
                    t[path] = min(t[path], step(m, path))
            self.timings[m] = t
            rival = min(t.get("gemm", float("inf")), t["float32"])
            kernel_losses = kernel_losses + 1 if t.get("kernels", float("inf")) > 0.9 * rival else 0
        self.decide(sizes)
        others = (_others_cpu() - busy0) / (time.perf_counter() - t0)
        if cache and others < 0.25:           # measured on a busy machine: measure again next time
            known[key] = {"packed_max_tokens": self.packed_max_tokens, "stack_max_tokens": self.stack_max_tokens,
                          "gemm_min_tokens": self.gemm_min_tokens, "timings": self.timings}
            _write_json(cache, known)
        log.info("compute plan: decode stack up to %s tokens a step (BLAS from %s), packed kernels op by op up to "
                 "%d (measured in %.1f s, other processes busy %.2f cores)", self.stack_max_tokens,
                 self.gemm_min_tokens or "never", self.packed_max_tokens, time.perf_counter() - t0, others)

    def decide(self, sizes) -> None:
        """The crossovers from `timings`. The packed kernels' cost grows with the step size
        much faster than a GEMM's, so they must win by a fifth; the stack's GEMM path is the
        same GEMM as float32 without the per-op overhead, so it may lose by a tenth (noise), and
        past the sizes measured it keeps winning if it won at the largest."""
        inf = float("inf")
        kern = lambda m: self.timings[m].get("kernels", inf)   # noqa: E731
        gemm = lambda m: self.timings[m].get("gemm", inf)      # noqa: E731
        f32 = lambda m: self.timings[m]["float32"]             # noqa: E731
        measured = [m for m in sizes if m in self.timings]
        self.packed_max_tokens = 0
        for m in measured:
            if kern(m) > 0.8 * f32(m):
                break
            self.packed_max_tokens = m
        self.gemm_min_tokens = next((m for i, m in enumerate(measured)
                                     if all(gemm(n) < kern(n) for n in measured[i:])), 0)
        # The stack wins ties: on its GEMM path it does float32's arithmetic without the per-op
        # overhead, so a near-tie is noise in one of the two timings, not a real loss.
        stack = lambda m: gemm(m) if self.gemm_min_tokens and m >= self.gemm_min_tokens else kern(m)   # noqa: E731
        self.stack_max_tokens = 0
        for m in measured:
            if stack(m) > 1.1 * f32(m):
                break
            self.stack_max_tokens = m
        # Past the sizes measured, a path that won at the largest keeps winning: the GEMM's cost
        # grows no faster than linearly, and neither do the VNNI panels' (int8), whose unpacking
        # is shared by every token of a step.
        if measured and self.stack_max_tokens == measured[-1] and (self.gemm_min_tokens or self.panels):
            self.stack_max_tokens = 1 << 30
        if measured and self.packed_max_tokens == measured[-1] and self.panels:
            self.packed_max_tokens = 1 << 30

    def stack(self, tokens: int) -> bool:
        use = tokens <= self.stack_max_tokens
        if use:
            self.steps["stack"] += 1
        return use

    def packed(self, tokens: int) -> bool:
        use = tokens <= self.packed_max_tokens
        self.steps["packed" if use else "float32"] += 1
        return use

    def info(self) -> dict:
        return {"compute": self.mode, "activations": "int8" if self.int8 else "float32",
                "packed_max_tokens": self.packed_max_tokens, "stack_max_tokens": self.stack_max_tokens,
                "gemm_min_tokens": self.gemm_min_tokens, "weight_bytes": self.weight_bytes,
                "panel_bytes": self.panel_bytes,
                "weight_types": dict(self.weight_types), "steps": dict(self.steps),
                "cpu_features": list(kernels().cpu_features()) if self.mode != "float32" else [],
                "timings_ms": {str(m): {k: round(v * 1e3, 3) for k, v in t.items()} for m, t in self.timings.items()}}


def plan_compute(weights: dict, *, compute: str, quantization: str | None, activations: str,
                 requantize: set[str], device: str) -> tuple[dict, ComputePlan]:
    """The weights as the engine will hold them, and the plan for multiplying them.
    float32 (or no packed matrix, or CUDA under auto): everything dequantized, as before.
    packed: the packed kernels for every step. auto: packed, with the crossover to the
    float32 GEMM measured once the model is built (`ComputePlan.measure`)."""
    if compute not in ("auto", "packed", "float32"):
        raise ModelLoadError(f"compute: must be auto, packed or float32, got {compute!r}")
    if compute == "packed" and device != "cpu":
        raise ModelLoadError(f"compute: 'packed' runs on the CPU; device is {device!r} (use auto or float32)")
    if quantization or requantize:
        weights = quantize_weights(weights, quantization, requantize)
    packed = [w for w in weights.values() if isinstance(w, PackedTensor)]
    if compute == "packed" and not packed:
        raise ModelLoadError("compute: 'packed' needs quantized weights: a Q4_0/Q4_1/Q8_0 GGUF file, or "
                             "quantization='q8_0' or 'q4_0' for a float model")
    if compute == "auto" and packed and not kernels_available():
        log.warning("packed-weight kernels unavailable (%s); computing in float32", _error)
    if compute == "float32" or not packed or device != "cpu" or not kernels_available():
        return {k: dequantize(w) if isinstance(w, PackedTensor) else w for k, w in weights.items()}, \
            ComputePlan("float32")
    forced = 1 << 30 if compute == "packed" else 0     # packed: the kernels for every step
    plan = ComputePlan(compute, int8=activations == "int8", packed_max_tokens=forced, stack_max_tokens=forced)
    return weights, plan


L2_TILE_MAX_TOKENS = 256   # measured: 64 tokens x the LM head 31 -> 19 ms; 1,024-token prefill 10 % slower
TILE_BYTES = 8 << 20    # a float32 tile of dequantized weights: fits in the last-level cache


def dequant_linear(x: torch.Tensor, p: PackedTensor, scratch: torch.Tensor) -> torch.Tensor:
    """x @ p^T through float32. Up to L2_TILE_MAX_TOKENS rows of x (the LM head of a big
    decode step, short prompts), with the BLAS GEMM that torch links: each thread dequantizes
    a few dozen weight rows at a time into a tile in its L2 and multiplies it there (kernels'
    `gemm`; the floats never reach memory). Wider (long prompts), or without that GEMM: tiles
    of TILE_BYTES dequantized into `scratch`, each through F.linear, whose own blocking then
    reads the activations fewer times."""
    rows, cols = p.shape
    mod, t = kernels(), GGML_TYPES[p.qtype]
    if x.shape[0] <= L2_TILE_MAX_TOKENS and mod.has_blas() and x.dtype == torch.float32:
        return gemm(x, p)
    step = max(1, TILE_BYTES // (4 * cols))
    if rows <= step:
        return F.linear(x, mod.dequantize(p.data, t, rows, cols, scratch[:rows * cols], -1))
    outs = [F.linear(x, mod.dequantize(p.data[r0:r0 + step], t, min(step, rows - r0), cols,
                                       scratch[:min(step, rows - r0) * cols], -1))
            for r0 in range(0, rows, step)]
    return torch.cat(outs, dim=1)


def scratch_for(mats: list[PackedTensor]) -> torch.Tensor:
    """One float32 buffer big enough for any tile `dequant_linear` makes of these matrices."""
    need = max((min(p.shape[0], max(1, TILE_BYTES // (4 * p.shape[1]))) * p.shape[1] for p in mats), default=1)
    return torch.empty(need)


def quantize_weights(weights: dict, quantization: str | None, requantize: set[str]) -> dict:
    """Matrices packed as the settings say: float matrices to `quantization` when it is set,
    and those the file held in a block format without kernels here (Q5_0, Q5_1) to it or,
    unset, to q8_0 (the closest to what the file had). 1-D tensors (norms, biases) stay float."""
    out = {}
    for name, w in weights.items():
        if isinstance(w, torch.Tensor) and w.dim() == 2 and (quantization or name in requantize):
            w = quantize(w, quantization or "q8_0")
        out[name] = w
    return out


def _others_cpu() -> float:
    """CPU-seconds the rest of the machine has used (all cores' busy time minus this
    process's); 0 where /proc/stat cannot be read."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return busy - t.user - t.system


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    """Atomically; a read-only home costs a measurement next time, not this load."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot write %s: %s", path, e)


def best_of(fn, repeats: int = 2) -> float:
    """The fastest of `repeats` timed calls, after one untimed."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
