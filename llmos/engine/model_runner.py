"""Turns a scheduled batch into tensors, runs the transformer, and owns the KV pool memory."""

from __future__ import annotations

import torch

from llmos.engine.lora import LoraBank
from llmos.config import llmos_home
from llmos.engine.packed import best_of, plan_compute
from llmos.engine.transformer import AttentionMetadata, Transformer
from llmos.kernel.request import ScheduledSeq, Sequence
from llmos.models.config import ModelConfig
from llmos.models.packed import PackedTensor

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], *, block_size: int,
                 kv_cache_memory: int, max_model_len: int, device: str, dtype: str,
                 decode_dtype: str | None = None, compute: str = "float32", quantization: str | None = None,
                 packed_activations: str = "float32", requantize: set[str] | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = _DTYPES[dtype]
        self.block_size = block_size
        weights, self.plan = plan_compute(weights, compute=compute, quantization=quantization,
                                          activations=packed_activations, requantize=requantize or set(),
                                          device=self.device.type)
        self.model = Transformer(cfg, weights, max_model_len, self.device, self.dtype,
                                 _DTYPES[decode_dtype] if decode_dtype else None, plan=self.plan)
        del weights
        self.plan.describe(self.model.matrices())
        self.lora = LoraBank(cfg.num_layers)   # resident LoRA adapters, by name
        self.num_blocks = max(1, kv_cache_memory // kv_bytes_per_block(cfg, block_size, self.dtype))
        slots = self.num_blocks * block_size
        # One flat [slots, KVH, D] tensor per layer for K and for V; slot = block * size + offset.
        self.kv_caches = [
            (torch.zeros(slots, cfg.num_kv_heads, cfg.head_dim, dtype=self.dtype, device=self.device),
             torch.zeros(slots, cfg.num_kv_heads, cfg.head_dim, dtype=self.dtype, device=self.device))
            for _ in range(cfg.num_layers)
        ]
        self.model.bind_caches(self.kv_caches)
        shapes = [[m.qtype if isinstance(m, PackedTensor) else str(m.dtype), list(m.shape)]
                  for m in self.model.matrices()]
        self.plan.measure(self._time_decode_step, shapes, llmos_home() / "cache" / "compute-plans.json")

    def _time_decode_step(self, n: int, path: str) -> float:
        """Seconds for one decode step of n sequences on one path (ComputePlan.PATHS)."""
        return best_of(lambda: self.scratch_decode(n, path), 1)

    def scratch_decode(self, n: int, path: str, ctx: int = 32) -> torch.Tensor:
        """Logits of one decode step of n sequences with ctx-token contexts, on one path
        (ComputePlan.PATHS, or "ops": the packed kernels op by op, outside the stack). For
        measuring at load, before any request: it writes KV slots of the first blocks, which
        must hold nothing anyone needs."""
        per = -(-ctx // self.block_size)
        n = min(n, self.num_blocks // per)
        if n < 1:
            return torch.empty(0)
        tables = torch.arange(n * per, device=self.device).view(n, per)
        lens = torch.full((n,), ctx, dtype=torch.long, device=self.device)
        slots = tables[:, (ctx - 1) // self.block_size] * self.block_size + (ctx - 1) % self.block_size
        meta = AttentionMetadata(slot_mapping=slots, decode_token_idx=torch.arange(n, device=self.device),
                                 decode_block_tables=tables, decode_context_lens=lens, block_size=self.block_size,
                                 prefills=[])
        ids = (torch.arange(n, device=self.device) * 7919 + 1) % self.cfg.vocab_size
        pos = torch.full((n,), ctx - 1, dtype=torch.long, device=self.device)
        plan = self.plan
        keep = plan.packed_max_tokens, plan.stack_max_tokens, plan.gemm_min_tokens
        plan.stack_max_tokens = 0 if path in ("float32", "ops") else n
        plan.packed_max_tokens = n if path in ("kernels", "ops") else 0     # the LM head, on the path's own kind
        plan.gemm_min_tokens = 1 if path == "gemm" else 0
        try:
            return self.model(ids, pos, self.kv_caches, meta, torch.arange(n, device=self.device))
        finally:
            plan.packed_max_tokens, plan.stack_max_tokens, plan.gemm_min_tokens = keep
            plan.steps = dict.fromkeys(plan.steps, 0)   # calibration steps are not served steps

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        sample_idx: list[int] = []
        dec_idx: list[int] = []
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        prefills: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] = []
        for item in batch:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            end = start + n
            flat_start = len(input_ids)
            tokens = seq.token_ids
            input_ids.extend(tokens[start:end])
            positions.extend(range(start, end))
            new_slots = self._slots(seq, start, end)
            slot_mapping.extend(new_slots)
            if n == 1:
                dec_idx.append(flat_start)
                dec_tables.append(seq.block_table)
                dec_lens.append(end)
            else:
                ctx = torch.tensor(self._slots(seq, 0, start) + new_slots, dtype=torch.long)
                mask = None
                if start > 0:   # True where a query may attend: its own position and every one before
                    mask = (torch.arange(end).unsqueeze(0) <= torch.arange(start, end).unsqueeze(1)).to(self.device)
                prefills.append((flat_start, flat_start + n, ctx.to(self.device), mask))
            if item.samples:
                sample_idx.append(len(input_ids) - 1)
        dev = self.device
        dec_token_idx = dec_bt = dec_cl = None
        if dec_idx:
            width = max(len(t) for t in dec_tables)
            dec_bt = torch.tensor([t + [0] * (width - len(t)) for t in dec_tables], dtype=torch.long, device=dev)
            dec_cl = torch.tensor(dec_lens, dtype=torch.long, device=dev)
            dec_token_idx = torch.tensor(dec_idx, dtype=torch.long, device=dev)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=dev),
            decode_token_idx=dec_token_idx, decode_block_tables=dec_bt, decode_context_lens=dec_cl,
            block_size=self.block_size, prefills=prefills)
        return (torch.tensor(input_ids, dtype=torch.long, device=dev),
                torch.tensor(positions, dtype=torch.long, device=dev), meta,
                torch.tensor(sample_idx, dtype=torch.long, device=dev))

    def execute(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """One forward pass for the whole batch; float32 logits on the CPU, one row per
        sequence that samples this step, in batch order."""
        input_ids, positions, meta, sample_idx = self.prepare(batch)
        lora = self.lora.plan([(item.seq.adapter, item.num_new_tokens) for item in batch], self.device)
        logits = self.model(input_ids, positions, self.kv_caches, meta, sample_idx, lora)
        return logits.cpu()

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """log P(token i | tokens before it) for i >= 1, from one causal prefill written to
        the pool's first slots: a quality measurement (perplexity) for an idle engine only."""
        n = len(token_ids)
        if not 2 <= n <= self.num_blocks * self.block_size:
            raise ValueError(f"score: needs 2 to {self.num_blocks * self.block_size} tokens, got {n}")
        dev = self.device
        slots = torch.arange(n, device=dev)
        meta = AttentionMetadata(slot_mapping=slots, decode_token_idx=None, decode_block_tables=None,
                                 decode_context_lens=None, block_size=self.block_size, prefills=[(0, n, slots, None)])
        ids = torch.tensor(token_ids, dtype=torch.long, device=dev)
        logits = self.model(ids, torch.arange(n, device=dev), self.kv_caches, meta, torch.arange(n - 1, device=dev))
        return torch.log_softmax(logits.float(), dim=-1).gather(1, ids[1:].unsqueeze(1)).squeeze(1).cpu()

    # -- context switching: copy a sequence's blocks out of the pool and back -------------
    def read_blocks(self, blocks: list[int]) -> torch.Tensor:
        """[layers, 2, n, block_size, KVH, D] copy of the given blocks, on the host."""
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        bs, KVH, D = self.block_size, self.cfg.num_kv_heads, self.cfg.head_dim
        out = torch.empty(len(self.kv_caches), 2, len(blocks), bs, KVH, D, dtype=self.dtype)
        for i, (k, v) in enumerate(self.kv_caches):
            out[i, 0] = k.view(-1, bs, KVH, D).index_select(0, idx).cpu()
            out[i, 1] = v.view(-1, bs, KVH, D).index_select(0, idx).cpu()
        return out

    def write_blocks(self, blocks: list[int], data: torch.Tensor) -> None:
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        bs, KVH, D = self.block_size, self.cfg.num_kv_heads, self.cfg.head_dim
        data = data.to(device=self.device, dtype=self.dtype)
        for i, (k, v) in enumerate(self.kv_caches):
            k.view(-1, bs, KVH, D).index_copy_(0, idx, data[i, 0])
            v.view(-1, bs, KVH, D).index_copy_(0, idx, data[i, 1])
