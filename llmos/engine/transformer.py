"""Llama-family transformer (Llama, SmolLM2, Mistral, Qwen2) over a paged KV cache.

The forward pass takes every scheduled token of every sequence flattened into one
[T, hidden] batch, so the GEMMs never see padding; only attention groups tokens by
sequence. q/k/v and gate/up projections are fused into one GEMM each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmos.engine.lora import LoraBatch
from llmos.engine.packed import (ComputePlan, attach_panels, decode_stack, dequant_linear, dequantize, embedding,
                                 matmul, panels_available, quantize, scratch_for)
from llmos.engine.paged_attention import paged_decode_attention, rope_and_store
from llmos.models.config import ModelConfig
from llmos.models.packed import PackedTensor


@dataclass
class AttentionMetadata:
    """How this step's flat tokens map onto sequences and KV slots (shared by all layers)."""
    slot_mapping: torch.Tensor                 # [T] slot index for each new token's K/V
    # Decode group: sequences contributing exactly one query token.
    decode_token_idx: torch.Tensor | None      # [Bd] positions in the flat batch
    decode_block_tables: torch.Tensor | None   # [Bd, max_blocks] (padded with 0)
    decode_context_lens: torch.Tensor | None   # [Bd]
    block_size: int
    # Prefill chunks: one entry per sequence with several query tokens.
    prefills: list[tuple[int, int, torch.Tensor, torch.Tensor | None]]  # (start, end, slots [L], mask [q, L] or None=causal)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        inv = inv / float(sc["factor"])
    elif kind == "llama3":
        factor = float(sc["factor"])
        low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
        old = float(sc.get("original_max_position_embeddings", 8192))
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = torch.where(medium, smoothed, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}")
    return inv


class Transformer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], max_positions: int,
                 device: torch.device, dtype: torch.dtype, decode_dtype: torch.dtype | None = None,
                 decode_max_tokens: int = 4, plan: ComputePlan | None = None) -> None:
        """`weights` may hold PackedTensors (matrices in GGUF block formats): those stay
        packed, and `plan` says which steps multiply them in place."""
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = H * D, KVH * D
        self.n_rep = H // KVH
        self.scale = 1.0 / math.sqrt(D)

        def w(name: str) -> torch.Tensor | PackedTensor:
            t = weights[name]
            return t if isinstance(t, PackedTensor) else t.to(device=device, dtype=dtype)

        self.embed = w("model.embed_tokens.weight")
        self.lm_head = self.embed if cfg.tie_word_embeddings or "lm_head.weight" not in weights else w("lm_head.weight")
        self.final_norm = w("model.norm.weight")
        self.layers: list[dict[str, torch.Tensor | None]] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            qkv_b = None
            if cfg.attention_bias:
                qkv_b = torch.cat([w(a + "q_proj.bias"), w(a + "k_proj.bias"), w(a + "v_proj.bias")])
            self.layers.append({
                "in_norm": w(p + "input_layernorm.weight"),
                "qkv": _stack([w(a + "q_proj.weight"), w(a + "k_proj.weight"), w(a + "v_proj.weight")]),
                "qkv_b": qkv_b,
                "o": w(a + "o_proj.weight"),
                "post_norm": w(p + "post_attention_layernorm.weight"),
                "gate_up": _stack([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")]),
                "down": w(p + "mlp.down_proj.weight"),
            })
        # Optional second copy of the matrices for small steps: a decode step of one or a few
        # sequences is bound by reading the weights, so half the bytes is nearly twice the
        # speed, while big batches are compute-bound and fastest in float32 on CPUs.
        self.decode_max_tokens = decode_max_tokens
        self.small: list[dict[str, torch.Tensor]] | None = None
        self.small_lm_head: torch.Tensor | None = None
        self.plan = plan
        packed = [m for m in self.matrices() if isinstance(m, PackedTensor)]
        if packed and plan is not None and plan.int8 and plan.mode != "float32" and panels_available():
            attach_panels(packed)
        self._scratch = scratch_for(packed) if packed else None
        self._packed_step = False
        self.stack = None
        if decode_dtype is not None and decode_dtype != dtype and not packed:
            mats = ("qkv", "o", "gate_up", "down")
            self.small = [{k: layer[k].to(decode_dtype) for k in mats} for layer in self.layers]
            self.small_lm_head = self.lm_head.to(decode_dtype)
        inv = rope_inv_freq(cfg)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(device=device, dtype=dtype)
        self.sin = emb.sin().to(device=device, dtype=dtype)

    def bind_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """With every layer packed on the CPU: the C++ decode stack that runs a decode step
        through all layers in one call (packed.DecodeStack), over these KV caches."""
        self.stack = None
        if self.plan is None or self.plan.mode == "float32" or not all(
                isinstance(layer[k], PackedTensor) for layer in self.layers for k in ("qkv", "o", "gate_up", "down")):
            return
        c = self.cfg
        self.stack = decode_stack(c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim,
                                  c.rms_norm_eps, self.layers, kv_caches)

    def matrices(self) -> list[torch.Tensor | PackedTensor]:
        """Every weight matrix a step multiplies by, the LM head last."""
        mats = [layer[k] for layer in self.layers for k in ("qkv", "o", "gate_up", "down")]
        return mats + [self.lm_head]

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.cfg.rms_norm_eps)

    def _attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, D]; caches: [slots, KVH, D]. Returns [T, H*D]."""
        T = q.shape[0]
        H, D, R = self.cfg.num_heads, self.cfg.head_dim, self.n_rep
        if not meta.prefills and meta.decode_token_idx is not None and meta.decode_token_idx.shape[0] == T:
            # Every token is a decode, in batch order: no gather, no scatter.
            return paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                                          meta.block_size, self.scale).view(T, H * D)
        out = torch.empty(T, H * D, dtype=q.dtype, device=q.device)
        if meta.decode_token_idx is not None:
            idx = meta.decode_token_idx
            B = idx.shape[0]
            o = paged_decode_attention(q[idx], k_cache, v_cache, meta.decode_block_tables,
                                       meta.decode_context_lens, meta.block_size, self.scale)
            out[idx] = o.reshape(B, H * D)
        for start, end, slots, mask in meta.prefills:
            # [1, heads, positions, D]: four-dimensional inputs take torch's fused (flash) CPU
            # kernel, with the KV groups shared by their query heads in place (enable_gqa);
            # three-dimensional ones fell to the unfused path, 5-7x slower on a 1,024-token prompt.
            L = end - start
            qp = q[start:end].transpose(0, 1).unsqueeze(0)
            kp = k_cache[slots].transpose(0, 1).unsqueeze(0)      # [1, KVH, ctx, D]
            vp = v_cache[slots].transpose(0, 1).unsqueeze(0)
            # mask None: a fresh prompt, plain causal over its own tokens; else [L, ctx] (True: attend)
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                               enable_gqa=R > 1)
            out[start:end] = o[0].transpose(0, 1).reshape(L, H * D)
        return out

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata, sample_idx: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        """Runs all layers on the flat batch; returns float32 logits for the rows in sample_idx.
        `lora` adds each row's adapter to the projections (None: no row has one)."""
        T = input_ids.shape[0]
        H, KVH, D = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        x = embedding(self.embed, input_ids) if isinstance(self.embed, PackedTensor) else F.embedding(input_ids, self.embed)
        small = self.small is not None and T <= self.decode_max_tokens
        if (self.stack is not None and lora is None and not meta.prefills and meta.decode_token_idx is not None
                and meta.decode_token_idx.shape[0] == T and self.plan.stack(T)):
            x = self.stack.forward(x.contiguous(), positions, self.cos, self.sin, meta.slot_mapping,
                                   meta.decode_block_tables, meta.decode_context_lens, meta.block_size,
                                   self.scale, self.plan.int8, -1, self.plan.gemm_min_tokens)
            return self._head(x, sample_idx, small)
        self._packed_step = self.plan is not None and self.plan.packed(T)
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches)):
            mats = self.small[i] if small else layer
            h = self._norm(x, layer["in_norm"])
            qkv = self._linear(h, mats["qkv"], layer["qkv_b"])
            if lora is not None:
                lora.add(i, "qkv", h, qkv)
            rope_and_store(qkv, positions, self.cos, self.sin, k_cache, v_cache, meta.slot_mapping, H, KVH, D)
            q = qkv[:, :self.q_size].view(T, H, D)
            attn = self._attention(q, k_cache, v_cache, meta)
            o = self._linear(attn, mats["o"])
            if lora is not None:
                lora.add(i, "o", attn, o)
            x = x + o
            h = self._norm(x, layer["post_norm"])
            gate_up = self._linear(h, mats["gate_up"])
            if lora is not None:
                lora.add(i, "gate_up", h, gate_up)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
            down = self._linear(act, mats["down"])
            if lora is not None:
                lora.add(i, "down", act, down)
            x = x + down
        return self._head(x, sample_idx, small)

    def _head(self, x: torch.Tensor, sample_idx: torch.Tensor, small: bool) -> torch.Tensor:
        h = self._norm(x[sample_idx], self.final_norm)
        self._packed_step = self.plan is not None and h.shape[0] <= self.plan.packed_max_tokens
        return self._linear(h, self.small_lm_head if small else self.lm_head).float()

    def _linear(self, x: torch.Tensor, w: torch.Tensor | PackedTensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(w, PackedTensor):
            y = matmul(x, w, self.plan.int8) if self._packed_step else dequant_linear(x, w, self._scratch)
            return y if b is None else y + b
        if w.dtype == x.dtype:
            return F.linear(x, w, b)
        return F.linear(x.to(w.dtype), w).to(x.dtype) + (b if b is not None else 0)


def _stack(parts: list[torch.Tensor | PackedTensor]) -> torch.Tensor | PackedTensor:
    """Matrices fused into one (q, k, v; gate, up). Packed parts of one type stay packed; a
    mix (a file that stores v at higher precision than q) is stacked as q8_0, or float32
    where some part is float."""
    if not any(isinstance(p, PackedTensor) for p in parts):
        return torch.cat(parts)
    if all(isinstance(p, PackedTensor) for p in parts) and len({p.qtype for p in parts}) == 1:
        return PackedTensor.cat(parts)
    dense = torch.cat([dequantize(p) if isinstance(p, PackedTensor) else p.float() for p in parts])
    return quantize(dense, "q8_0") if all(isinstance(p, PackedTensor) for p in parts) else dense
