"""Decode attention straight from the paged KV pool.

Gathering every sequence's blocks into a padded tensor each step copies the whole live
cache once per layer and then pads attention to the longest context; on a 2-core CPU that
costs as much as the GEMMs. This C++ kernel instead walks each sequence's block table and
reads K and V in place, one (sequence, KV head) pair per task, sharing every loaded key
among the query heads of its group. It is compiled once per machine with the compiler
torch was built to use and cached by torch. Where it cannot be built (or on CUDA, or for
non-float32 caches) the same computation runs in plain PyTorch.
"""

from __future__ import annotations

import logging
import os
import threading

import torch
import torch.nn.functional as F

log = logging.getLogger("llmos.engine")

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

// One (sequence, KV head) task: the R query heads of the group share every key and value read.
template <int D>
static void attend_group(const float* qg, const float* kp, const float* vp, const int64_t* table,
                         int64_t L, int64_t block_size, int64_t KVH, int64_t g, int64_t R, float sc,
                         float* scores, float* out) {
  for (int64_t pos = 0; pos < L; ++pos) {
    const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
    const float* k = kp + (slot * KVH + g) * D;
    for (int64_t r = 0; r < R; ++r) {
      const float* qr = qg + r * D;
      float s = 0.f;
      for (int d = 0; d < D; ++d) s += qr[d] * k[d];
      scores[r * L + pos] = s * sc;
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    float* sr = scores + r * L;
    float m = -INFINITY;
    for (int64_t p = 0; p < L; ++p) m = sr[p] > m ? sr[p] : m;
    float sum = 0.f;
    for (int64_t p = 0; p < L; ++p) { sr[p] = std::exp(sr[p] - m); sum += sr[p]; }
    const float inv = 1.f / sum;
    for (int64_t p = 0; p < L; ++p) sr[p] *= inv;
  }
  float acc[8][D];
  for (int64_t r = 0; r < R; ++r) for (int d = 0; d < D; ++d) acc[r][d] = 0.f;
  for (int64_t pos = 0; pos < L; ++pos) {
    const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
    const float* v = vp + (slot * KVH + g) * D;
    for (int64_t r = 0; r < R; ++r) {
      const float w = scores[r * L + pos];
      for (int d = 0; d < D; ++d) acc[r][d] += w * v[d];
    }
  }
  for (int64_t r = 0; r < R; ++r) for (int d = 0; d < D; ++d) out[r * D + d] = acc[r][d];
}

template <int D>
static void run(const float* qp, const float* kp, const float* vp, const int64_t* bt, const int64_t* cl,
                float* op, int64_t B, int64_t H, int64_t KVH, int64_t MB, int64_t block_size, float sc) {
  const int64_t R = H / KVH;
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, g = task % KVH;
      scores.resize(R * cl[b]);
      attend_group<D>(qp + (b * H + g * R) * D, kp, vp, bt + b * MB, cl[b], block_size, KVH, g, R, sc,
                      scores.data(), op + (b * H + g * R) * D);
    }
  });
}

// q: [B, H, D]; k_cache, v_cache: [slots, KVH, D]; block_tables: [B, max_blocks] int64;
// context_lens: [B] int64. Returns [B, H, D]. All float32, contiguous; head_dim 64 or 128,
// at most 8 query heads per KV head.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens,
                           int64_t block_size, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1);
  TORCH_CHECK(H / KVH <= 8, "at most 8 query heads per KV head");
  auto out = torch::empty_like(q);
  auto args = std::make_tuple(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                              block_tables.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(),
                              out.data_ptr<float>());
  const int64_t MB = block_tables.size(1);
  if (D == 64) run<64>(std::get<0>(args), std::get<1>(args), std::get<2>(args), std::get<3>(args), std::get<4>(args), std::get<5>(args), B, H, KVH, MB, block_size, (float)scale);
  else if (D == 128) run<128>(std::get<0>(args), std::get<1>(args), std::get<2>(args), std::get<3>(args), std::get<4>(args), std::get<5>(args), B, H, KVH, MB, block_size, (float)scale);
  else TORCH_CHECK(false, "head_dim must be 64 or 128");
  return out;
}

// In place on qkv [T, (H + 2 KVH) * D]: rotate q and k by their positions (rotate-half RoPE,
// cos/sin tables [max_pos, D]) and store k and v into the caches [slots, KVH, D] at slots[t].
void rope_and_store(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
                    torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                    int64_t H, int64_t KVH, int64_t D) {
  const int64_t T = qkv.size(0), row = qkv.stride(0), half = D / 2;
  float* x = qkv.data_ptr<float>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + pos[t] * D;
      const float* s = sp + pos[t] * D;
      float* xt = x + t * row;
      for (int64_t h = 0; h < H + KVH; ++h) {
        float* v = xt + h * D;
        for (int64_t d = 0; d < half; ++d) {
          const float a = v[d], b = v[d + half];
          v[d] = a * c[d] - b * s[d];
          v[d + half] = b * c[d + half] + a * s[d + half];
        }
      }
      std::copy(xt + H * D, xt + (H + KVH) * D, kc + sl[t] * KVH * D);
      std::copy(xt + (H + KVH) * D, xt + (H + 2 * KVH) * D, vc + sl[t] * KVH * D);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache");
  m.def("rope_and_store", &rope_and_store, "RoPE on q and k, then k and v into the paged cache");
}
"""

_lock = threading.Lock()
_module = None
_tried = False


def _load():
    global _module, _tried
    with _lock:
        if not _tried:
            _tried = True
            if os.environ.get("LLMOS_NO_KERNELS"):
                return None
            try:
                from torch.utils.cpp_extension import load_inline
                _module = load_inline(
                    name="llmos_paged_attention_v3", cpp_sources=[_SOURCE], functions=None,
                    extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"], verbose=False)
            except Exception as e:  # no compiler, no ninja, ...: plain PyTorch still works
                log.warning("paged attention kernel unavailable, using PyTorch fallback: %s", e)
                _module = None
    return _module


def kernel_available() -> bool:
    return _load() is not None


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                           scale: float) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context. q: [B, H, D];
    caches: [slots, KVH, D]; block_tables: [B, max_blocks]; context_lens: [B]. -> [B, H, D]."""
    if (q.device.type == "cpu" and q.dtype == torch.float32 and k_cache.dtype == torch.float32
            and q.shape[-1] in (64, 128) and q.shape[1] // k_cache.shape[1] <= 8):
        mod = _load()
        if mod is not None:
            return mod.paged_decode(q.contiguous(), k_cache, v_cache, block_tables, context_lens, block_size, scale)
    return _paged_decode_torch(q, k_cache, v_cache, block_tables, context_lens, block_size, scale)


def rope_and_store(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                   num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """In place on qkv [T, (H + 2*KVH) * D]: RoPE on the q and k parts, then k and v written
    to the paged caches at `slots`. One pass instead of a dozen small tensor ops per layer."""
    if (qkv.device.type == "cpu" and qkv.dtype == torch.float32 and k_cache.dtype == torch.float32
            and qkv.stride(1) == 1):
        mod = _load()
        if mod is not None:
            mod.rope_and_store(qkv, positions, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads, head_dim)
            return
    T = qkv.shape[0]
    H, KVH, D = num_heads, num_kv_heads, head_dim
    qk = qkv[:, :(H + KVH) * D].view(T, H + KVH, D)
    c, s_ = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    half = D // 2
    qk.copy_(qk * c + torch.cat([-qk[..., half:], qk[..., :half]], dim=-1) * s_)
    k_cache.index_copy_(0, slots, qk[:, H:])
    v_cache.index_copy_(0, slots, qkv[:, (H + KVH) * D:].view(T, KVH, D))


def _paged_decode_torch(q, k_cache, v_cache, block_tables, context_lens, block_size, scale):
    B, H, D = q.shape
    KVH = k_cache.shape[1]
    L = int(context_lens.max())
    pos = torch.arange(L, device=q.device)
    slots = block_tables.gather(1, (pos // block_size).expand(B, L)) * block_size + pos % block_size
    pad = pos.unsqueeze(0) >= context_lens.unsqueeze(1)
    slots = slots.masked_fill(pad, 0)
    k = k_cache[slots].permute(0, 2, 1, 3)   # [B, KVH, L, D]
    v = v_cache[slots].permute(0, 2, 1, 3)
    mask = torch.zeros(B, 1, 1, L, dtype=q.dtype, device=q.device).masked_fill_(pad.view(B, 1, 1, L), float("-inf"))
    o = F.scaled_dot_product_attention(q.view(B, KVH, H // KVH, D), k, v, attn_mask=mask, scale=scale)
    return o.reshape(B, H, D)
