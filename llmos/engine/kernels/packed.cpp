// Matrix products straight from GGUF-packed weights (Q4_0, Q4_1, Q8_0).
//
// A decode step reads every weight once and does little arithmetic with it, so its speed is
// the bytes it reads: 4.5-8.5 bits a weight here instead of 32. Two variants:
//   int8:  the activations are quantized to 8 bits per block of 32 (a float scale each) and
//          multiplied with the weights' integers (AVX2 vpmaddubsw: 32 multiply-adds an
//          instruction), as llama.cpp does;
//   exact: the weights are dequantized in registers and multiplied with float32 activations:
//          the same result as float32 weights up to summation order.
// Each has an AVX-512 (VNNI) version, an AVX2+FMA+F16C version, chosen at run time from the
// CPU's features, and a portable C++ version, which runs everywhere and is what the SIMD
// ones are tested against.
// Work is split over weight rows with at::parallel_for (torch's own thread pool).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <thread>
#include <utility>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLMOS_X86 1
#endif

// The BLAS that torch links (MKL on x86 builds), for big steps inside the decode stack: weak,
// so a torch without it still loads this module and those steps use the packed kernels.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace {

#ifndef PREFETCH
#define PREFETCH 2048
#endif
#ifndef GEMM_TILE_FLOATS
#define GEMM_TILE_FLOATS 131072
#endif
#ifndef SILU_SHARE_TOKENS
#define SILU_SHARE_TOKENS 8
#endif
#ifndef GEMM_ROWS_MAX
#define GEMM_ROWS_MAX 256
#endif
constexpr int QK = 32;                      // weights per block: Q4_0, Q4_1, Q8_0
constexpr int QK_K = 256;                   // weights per super-block: the K-quants
enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };   // GGML's type ids

int64_t block_bytes(int64_t t) {
  switch (t) {
    case Q4_0: return 18;   // fp16 d, 16 bytes of nibbles:         w = d * (q - 8)
    case Q4_1: return 20;   // fp16 d, fp16 m, 16 bytes of nibbles: w = d * q + m
    case Q8_0: return 34;   // fp16 d, 32 int8:                     w = d * q
    case Q4_K: return 144;  // fp16 d, dmin, 8 x 6-bit scales and mins, 128 bytes of nibbles
    case Q5_K: return 176;  // as Q4_K, and 32 bytes of fifth bits
    case Q6_K: return 210;  // 128 bytes of low nibbles, 64 of high 2 bits, 16 int8 scales, fp16 d
  }
  TORCH_CHECK(false, "unsupported packed type ", t);
}

bool is_k(int64_t t) { return t == Q4_K || t == Q5_K || t == Q6_K; }
int64_t block_values(int64_t t) { return is_k(t) ? QK_K : QK; }

// An activation block quantized to 8 bits: x ~= d * qs; s = d * sum(qs) (for Q4_0 / Q4_1's offsets).
struct ActBlock {
  float d;
  float s;
  int8_t qs[QK];
};

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {                                 // subnormal: normalise
      exp = 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      man &= 0x3FF;
      bits = sign | ((exp + 112) << 23) | (man << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000 | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_half(float f) {     // round to nearest even, as numpy's float16 does
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = (x >> 16) & 0x8000;
  const uint32_t absx = x & 0x7FFFFFFF;
  if (absx >= 0x7F800000) return sign | 0x7C00 | (absx > 0x7F800000 ? 0x200 : 0);
  if (absx >= 0x477FF000) return sign | 0x7C00;              // overflows to inf
  if (absx < 0x38800000) {                                   // subnormal or zero
    if (absx < 0x33000000) return sign;
    const uint32_t e = absx >> 23, m = (absx & 0x7FFFFF) | 0x800000;
    const int shift = 126 - e;
    uint32_t r = m >> (shift - 10 + 1 + 12);
    const uint32_t rem = m & ((1u << (shift + 3)) - 1), half = 1u << (shift + 2);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return sign | r;
  }
  uint32_t r = absx - 0x38000000;
  r = (r + 0xFFF + ((r >> 13) & 1)) >> 13;
  return sign | (uint16_t)r;
}

inline float rd_half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return half_to_float(h);
}

// ---------------------------------------------------------------------------------------------
// Portable versions.

void quantize_act_portable(const float* x, int64_t nb, ActBlock* out) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * QK;
    float amax = 0.f;
    for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127.f, id = d ? 1.f / d : 0.f;
    int sum = 0;
    for (int j = 0; j < QK; ++j) {
      const int q = (int)std::nearbyint(xb[j] * id);
      out[b].qs[j] = (int8_t)q;
      sum += q;
    }
    out[b].d = d;
    out[b].s = d * (float)sum;
  }
}

// Weight w (row-major, K values per row) decoded to float, one block.
inline void dequant_block(int64_t t, const uint8_t* w, float* out) {
  if (t == Q8_0) {
    const float d = rd_half(w);
    const int8_t* q = (const int8_t*)(w + 2);
    for (int j = 0; j < QK; ++j) out[j] = d * q[j];
  } else {
    const float d = rd_half(w);
    const float m = t == Q4_1 ? rd_half(w + 2) : -8.f * d;
    const uint8_t* q = w + (t == Q4_1 ? 4 : 2);
    for (int j = 0; j < QK / 2; ++j) {
      out[j] = d * (q[j] & 0x0F) + m;
      out[j + QK / 2] = d * (q[j] >> 4) + m;
    }
  }
}

// A K-quant super-block (256 weights) decoded to float, in gguf-py's order of operations, so
// the results are the same floats: (d * sc) * q - dmin * m, and Q6_K's (d * sc) * q.
inline void k_scale_min(const uint8_t* sc, int j, int& s, int& m) {   // Q4_K/Q5_K's 6-bit pairs
  if (j < 4) {
    s = sc[j] & 63;
    m = sc[j + 4] & 63;
  } else {
    s = (sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4);
    m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
  }
}

inline void dequant_super(int64_t t, const uint8_t* w, float* out) {
  // Loops of 16 or 32 lanes with shifts fixed per loop: the compiler vectorizes them.
  if (t == Q6_K) {
    const uint8_t *ql = w, *qh = w + 128;
    const int8_t* sc = (const int8_t*)(w + 192);
    const float d = rd_half(w + 208);
    for (int h = 0; h < 2; ++h)
      for (int g = 0; g < 4; ++g) {           // 32 weights: low nibbles of ql, 2 bits of qh
        const uint8_t* lo = ql + 64 * h + 32 * (g % 2);
        const uint8_t* hi = qh + 32 * h;
        const int lshift = 4 * (g / 2), hshift = 2 * g;
        for (int half = 0; half < 2; ++half) {
          const float ds = d * (float)sc[8 * h + 2 * g + half];
          float* o = out + 128 * h + 32 * g + 16 * half;
          for (int l = 16 * half; l < 16 * half + 16; ++l)
            o[l - 16 * half] = ds * (float)((((lo[l] >> lshift) & 0x0F) | (((hi[l] >> hshift) & 0x03) << 4)) - 32);
        }
      }
    return;
  }
  const float d = rd_half(w), dmin = rd_half(w + 2);
  const uint8_t* sc = w + 4;
  for (int j = 0; j < 8; ++j) {
    int s, m;
    k_scale_min(sc, j, s, m);
    const float ds = d * (float)s, dm = dmin * (float)m;
    const int shift = 4 * (j % 2);
    float* o = out + 32 * j;
    if (t == Q5_K) {
      const uint8_t* qh = w + 16;
      const uint8_t* q = w + 48 + 32 * (j / 2);
      for (int l = 0; l < 32; ++l) o[l] = ds * (float)(((q[l] >> shift) & 0x0F) | (((qh[l] >> j) & 1) << 4)) - dm;
    } else {
      const uint8_t* q = w + 16 + 32 * (j / 2);
      for (int l = 0; l < 32; ++l) o[l] = ds * (float)((q[l] >> shift) & 0x0F) - dm;
    }
  }
}

float dot_int8_portable(int64_t t, const uint8_t* w, const ActBlock* a, int64_t nb) {
  const int64_t bs = block_bytes(t);
  float sum = 0.f;
  for (int64_t b = 0; b < nb; ++b, w += bs) {
    const float d = rd_half(w);
    int isum = 0;
    if (t == Q8_0) {
      const int8_t* q = (const int8_t*)(w + 2);
      for (int j = 0; j < QK; ++j) isum += q[j] * a[b].qs[j];
      sum += d * a[b].d * isum;
    } else {
      const uint8_t* q = w + (t == Q4_1 ? 4 : 2);
      for (int j = 0; j < QK / 2; ++j) isum += (q[j] & 0x0F) * a[b].qs[j] + (q[j] >> 4) * a[b].qs[j + QK / 2];
      sum += d * a[b].d * isum + (t == Q4_1 ? rd_half(w + 2) : -8.f * d) * a[b].s;
    }
  }
  return sum;
}

float dot_exact_portable(int64_t t, const uint8_t* w, const float* x, int64_t nb) {
  const int64_t bs = block_bytes(t);
  float buf[QK];
  float sum = 0.f;
  for (int64_t b = 0; b < nb; ++b, w += bs) {
    dequant_block(t, w, buf);
    float s = 0.f;
    for (int j = 0; j < QK; ++j) s += buf[j] * x[b * QK + j];
    sum += s;
  }
  return sum;
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C versions, compiled for those features whatever the build flags say and
// called only where the CPU has them.

#ifdef LLMOS_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

AVX2 inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// 16 bytes of nibbles -> 32 bytes 0..15: low nibbles are values 0-15, high nibbles 16-31.
AVX2 inline __m256i nibbles(const uint8_t* q) {
  const __m128i t = _mm_loadu_si128((const __m128i*)q);
  const __m256i v = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
  return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

// sum over 32 pairs of unsigned weight bytes and signed activation bytes, as 8 floats.
AVX2 inline __m256 udot(__m256i w, __m256i a) {
  const __m256i p16 = _mm256_maddubs_epi16(w, a);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

AVX2 inline __m256 sdot(__m256i w, __m256i a) {   // both signed: |w| times a with w's sign
  return udot(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
}

AVX2 void quantize_act_avx2(const float* x, int64_t nb, ActBlock* out) {
  const __m256 signbit = _mm256_set1_ps(-0.f);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * QK;
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(signbit, v[i]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float d = _mm_cvtss_f32(m) / 127.f, id = d ? 1.f / d : 0.f;
    const __m256 mul = _mm256_set1_ps(id);
    __m256i q[4];
    for (int i = 0; i < 4; ++i)
      q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], mul), _MM_ROUND_NEAREST | _MM_FROUND_NO_EXC));
    const __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
    s = _mm_hadd_epi32(s, s);
    s = _mm_hadd_epi32(s, s);
    // int32 -> int16 -> int8, then undo the lane interleaving of the packs.
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i*)out[b].qs, p);
    out[b].d = d;
    out[b].s = d * (float)_mm_cvtsi128_si32(s);
  }
}

// R activation rows against one weight row; out[r] = dot(w, a_r). R <= 4.
template <int R>
AVX2 void dot_int8_avx2(int64_t t, const uint8_t* w, const ActBlock* const* a, int64_t nb, float* out) {
  const int64_t bs = block_bytes(t);
  __m256 acc[R];
  float off[R];
  for (int r = 0; r < R; ++r) { acc[r] = _mm256_setzero_ps(); off[r] = 0.f; }
  for (int64_t b = 0; b < nb; ++b, w += bs) {
    const float d = h2f(w);
    if (t == Q8_0) {
      const __m256i q = _mm256_loadu_si256((const __m256i*)(w + 2));
      for (int r = 0; r < R; ++r) {
        const __m256i x = _mm256_loadu_si256((const __m256i*)a[r][b].qs);
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a[r][b].d), sdot(q, x), acc[r]);
      }
    } else {
      const bool q41 = t == Q4_1;
      const __m256i q = nibbles(w + (q41 ? 4 : 2));
      const float m = q41 ? h2f(w + 2) : -8.f * d;
      for (int r = 0; r < R; ++r) {
        const __m256i x = _mm256_loadu_si256((const __m256i*)a[r][b].qs);
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a[r][b].d), udot(q, x), acc[r]);
        off[r] += m * a[r][b].s;
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) + off[r];
}

// One block of weights as 4 x 8 floats.
AVX2 inline void dequant_avx2(int64_t t, const uint8_t* w, __m256* f) {
  const __m256 d = _mm256_set1_ps(h2f(w));
  if (t == Q8_0) {
    const __m256i q = _mm256_loadu_si256((const __m256i*)(w + 2));
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    f[0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)));
    f[1] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))));
    f[2] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)));
    f[3] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))));
  } else {
    const bool q41 = t == Q4_1;
    const __m256 m = q41 ? _mm256_set1_ps(h2f(w + 2)) : _mm256_mul_ps(d, _mm256_set1_ps(-8.f));
    const __m256i q = nibbles(w + (q41 ? 4 : 2));
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    f[0] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), m);
    f[1] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), m);
    f[2] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), m);
    f[3] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), m);
  }
}

template <int R>
AVX2 void dot_exact_avx2(int64_t t, const uint8_t* w, const float* const* x, int64_t nb, float* out) {
  const int64_t bs = block_bytes(t);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  __m256 f[4];
  for (int64_t b = 0; b < nb; ++b, w += bs) {
    dequant_avx2(t, w, f);
    for (int r = 0; r < R; ++r) {
      const float* xb = x[r] + b * QK;
      __m256 s = _mm256_mul_ps(f[0], _mm256_loadu_ps(xb));
      s = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xb + 8), s);
      s = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(xb + 16), s);
      acc[r] = _mm256_add_ps(acc[r], _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xb + 24), s));
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

AVX2 void dequant_row_avx2(int64_t t, const uint8_t* w, int64_t nb, float* out) {
  const int64_t bs = block_bytes(t);
  __m256 f[4];
  for (int64_t b = 0; b < nb; ++b, w += bs, out += QK) {
    dequant_avx2(t, w, f);
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + 8 * i, f[i]);
  }
}


// AVX-512 VNNI: vpdpbusd multiplies 64 unsigned weight bytes by 64 signed activation bytes
// and adds them into 16 int32 lanes in one instruction; two blocks per step. Every type is
// made unsigned (Q8_0 by adding 128) and the offset it carries is folded into the block's
// constant term: dot(w, a) = d_w d_a dot_u(w, a) + off_w s_a, s_a = d_a sum(a).
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

VNNI inline __m256i unsigned_q(int64_t t, const uint8_t* w) {
  if (t == Q8_0) return _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(w + 2)), _mm256_set1_epi8((char)0x80));
  return nibbles(w + (t == Q4_1 ? 4 : 2));
}

VNNI inline float offset_of(int64_t t, const uint8_t* w, float d) {
  return t == Q4_1 ? h2f(w + 2) : t == Q4_0 ? -8.f * d : -128.f * d;
}

template <int R>
VNNI void dot_int8_vnni(int64_t t, const uint8_t* w, const ActBlock* const* a, int64_t nb, float* out) {
  const int64_t bs = block_bytes(t);
  __m512 acc[R];
  float off[R];
  for (int r = 0; r < R; ++r) { acc[r] = _mm512_setzero_ps(); off[r] = 0.f; }
  int64_t b = 0;
  for (; b + 1 < nb; b += 2, w += 2 * bs) {
    _mm_prefetch((const char*)(w + PREFETCH), _MM_HINT_T0);
    const float d0 = h2f(w), d1 = h2f(w + bs);
    const float o0 = offset_of(t, w, d0), o1 = offset_of(t, w + bs, d1);
    const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(unsigned_q(t, w)), unsigned_q(t, w + bs), 1);
    for (int r = 0; r < R; ++r) {
      const ActBlock& a0 = a[r][b];
      const ActBlock& a1 = a[r][b + 1];
      const __m512i x = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)a0.qs)),
                                           _mm256_loadu_si256((const __m256i*)a1.qs), 1);
      const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, x);
      const __m512 sc = _mm512_insertf32x8(_mm512_set1_ps(d0 * a0.d), _mm256_set1_ps(d1 * a1.d), 1);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sc, acc[r]);
      off[r] += o0 * a0.s + o1 * a1.s;
    }
  }
  float res[R];
  for (int r = 0; r < R; ++r) res[r] = _mm512_reduce_add_ps(acc[r]) + off[r];
  if (b < nb) {                              // an odd last block, 256 bits wide
    const float d = h2f(w), o = offset_of(t, w, d);
    const __m256i q = unsigned_q(t, w);
    for (int r = 0; r < R; ++r) {
      const __m256i x = _mm256_loadu_si256((const __m256i*)a[r][b].qs);
      const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, x);
      res[r] += d * a[r][b].d * hsum(_mm256_cvtepi32_ps(p)) + o * a[r][b].s;
    }
  }
  for (int r = 0; r < R; ++r) out[r] = res[r];
}


// The exact variant 16 lanes wide: a block of weights dequantized into two registers.
VNNI inline void dequant512(int64_t t, const uint8_t* w, __m512* f) {
  const __m512 d = _mm512_set1_ps(h2f(w));
  if (t == Q8_0) {
    f[0] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + 2)))));
    f[1] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + 18)))));
  } else {
    const bool q41 = t == Q4_1;
    const __m512 m = q41 ? _mm512_set1_ps(h2f(w + 2)) : _mm512_mul_ps(d, _mm512_set1_ps(-8.f));
    const __m128i q = _mm_loadu_si128((const __m128i*)(w + (q41 ? 4 : 2))), mask = _mm_set1_epi8(0x0F);
    f[0] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, mask))), m);
    f[1] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), mask))), m);
  }
}

template <int R>
VNNI void dot_exact_512(int64_t t, const uint8_t* w, const float* const* x, int64_t nb, float* out) {
  const int64_t bs = block_bytes(t);
  __m512 acc[R], f[2];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, w += bs) {
    dequant512(t, w, f);
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_fmadd_ps(f[0], _mm512_loadu_ps(x[r] + b * QK), acc[r]);
      acc[r] = _mm512_fmadd_ps(f[1], _mm512_loadu_ps(x[r] + b * QK + 16), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// The tiles' shared inner step: C dequantized weight blocks (as two halves) times R
// activation blocks starting at float `at`, into two accumulators a pair; and their sums.
template <int C, int R>
VNNI inline void fma_tile(const __m512 (&f)[C][2], const float* const* x, int64_t at, __m512 (&acc)[C][R][2]) {
  for (int r = 0; r < R; ++r) {
    const __m512 x0 = _mm512_loadu_ps(x[r] + at), x1 = _mm512_loadu_ps(x[r] + at + 16);
    for (int c = 0; c < C; ++c) {
      acc[c][r][0] = _mm512_fmadd_ps(f[c][0], x0, acc[c][r][0]);
      acc[c][r][1] = _mm512_fmadd_ps(f[c][1], x1, acc[c][r][1]);
    }
  }
}

template <int C, int R>
VNNI inline void sum_tile(const __m512 (&acc)[C][R][2], float* out) {
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) out[c * R + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[c][r][0], acc[c][r][1]));
}

// A tile of C weight rows x R activation rows, each weight block dequantized once for the R
// rows and each activation block loaded once for the C rows: out[c * R + r] = dot(w_c, x_r).
// Every (c, r) pair keeps two accumulators (one per half block), so no FMA waits on the one
// before it.
template <int C, int R>
VNNI void tile_exact_512(int64_t t, const uint8_t* w, int64_t row, const float* const* x, int64_t nb, float* out) {
  const int64_t bs = block_bytes(t);
  __m512 acc[C][R][2], f[C][2];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r][0] = acc[c][r][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    for (int c = 0; c < C; ++c) {
      _mm_prefetch((const char*)(w + c * row + b * bs + PREFETCH), _MM_HINT_T0);
      dequant512(t, w + c * row + b * bs, f[c]);
    }
    fma_tile<C, R>(f, x, b * QK, acc);
  }
  sum_tile<C, R>(acc, out);
}

// Q4_0 / Q4_1 for a few tokens, with half the vector work a block: the 16 nibble bytes are
// broadcast to all four 128-bit lanes, a variable shift puts a different nibble in the low 4
// bits of each 32-bit lane, and vpermps looks the weight up in a 16-entry table d * q + m
// made by one FMA (vpermps reads only those 4 bits, so no masking and no widening). The
// lanes come out in the order Q4_LANE says, so each token's activations are put in that
// order once per matmul (q4_permute), not once per weight row.
alignas(64) constexpr int Q4_LANE[2][16] = {   // weight index of each lane, for the two registers
    {0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29},
    {2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31}};

VNNI void q4_permute(const float* x, int64_t nb, float* out) {
  const __m512i i0 = _mm512_load_si512(Q4_LANE[0]), i1 = _mm512_load_si512(Q4_LANE[1]);
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 lo = _mm512_loadu_ps(x + b * QK), hi = _mm512_loadu_ps(x + b * QK + 16);
    _mm512_storeu_ps(out + b * QK, _mm512_permutex2var_ps(lo, i0, hi));
    _mm512_storeu_ps(out + b * QK + 16, _mm512_permutex2var_ps(lo, i1, hi));
  }
}

template <int C, int R>
VNNI void tile_q4_512(int64_t t, const uint8_t* w, int64_t row, const float* const* xp, int64_t nb, float* out) {
  const int64_t bs = block_bytes(t), qoff = t == Q4_1 ? 4 : 2;
  // Lane (l, j) (128-bit lane l, dword j) holds dword j of the nibbles shifted by 4l (first
  // register) or 16 + 4l (second): byte 4j + l / 2 (+ 2), low nibble for even l, high for odd.
  const __m512i sh0 = _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12);
  const __m512i sh1 = _mm512_add_epi32(sh0, _mm512_set1_epi32(16));
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 iota8 = _mm512_sub_ps(iota, _mm512_set1_ps(8.f));
  __m512 acc[C][R][2];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r][0] = acc[c][r][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 f[C][2];
    for (int c = 0; c < C; ++c) {
      const uint8_t* wb = w + c * row + b * bs;
      _mm_prefetch((const char*)(wb + PREFETCH), _MM_HINT_T0);
      __m512 table;
      if (t == Q4_1) {   // d and m as halves of one dword: lanes alternate d, m
        int32_t dm;
        std::memcpy(&dm, wb, 4);
        const __m512 v = _mm512_cvtph_ps(_mm256_set1_epi32(dm));
        table = _mm512_fmadd_ps(_mm512_moveldup_ps(v), iota, _mm512_movehdup_ps(v));
      } else {
        table = _mm512_mul_ps(_mm512_set1_ps(h2f(wb)), iota8);
      }
      const __m512i q = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(wb + qoff)));
      f[c][0] = _mm512_permutexvar_ps(_mm512_srlv_epi32(q, sh0), table);
      f[c][1] = _mm512_permutexvar_ps(_mm512_srlv_epi32(q, sh1), table);
    }
    fma_tile<C, R>(f, xp, b * QK, acc);
  }
  sum_tile<C, R>(acc, out);
}

using ExactTile = void (*)(int64_t, const uint8_t*, int64_t, const float* const*, int64_t, float*);

ExactTile q4_tile_512(int C, int R) {   // C = 4 with R <= 2, C = 2 with R <= 4, C = 1 with R <= 8
  static const ExactTile one[8] = {tile_q4_512<1, 1>, tile_q4_512<1, 2>, tile_q4_512<1, 3>, tile_q4_512<1, 4>,
                                   tile_q4_512<1, 5>, tile_q4_512<1, 6>, tile_q4_512<1, 7>, tile_q4_512<1, 8>};
  static const ExactTile two[4] = {tile_q4_512<2, 1>, tile_q4_512<2, 2>, tile_q4_512<2, 3>, tile_q4_512<2, 4>};
  static const ExactTile four[2] = {tile_q4_512<4, 1>, tile_q4_512<4, 2>};
  return C == 4 ? four[R - 1] : C == 2 ? two[R - 1] : one[R - 1];
}

// The tile for R activation rows (1..8) and C weight rows (1, 2 or 4): more weight rows for
// few tokens (independent work for a single stream), more tokens for one weight row in big
// steps (the dequantizing shared by more of them).
ExactTile exact_tile_512(int C, int R) {
  static const ExactTile one[8] = {tile_exact_512<1, 1>, tile_exact_512<1, 2>, tile_exact_512<1, 3>,
                                   tile_exact_512<1, 4>, tile_exact_512<1, 5>, tile_exact_512<1, 6>,
                                   tile_exact_512<1, 7>, tile_exact_512<1, 8>};
  static const ExactTile two[4] = {tile_exact_512<2, 1>, tile_exact_512<2, 2>, tile_exact_512<2, 3>,
                                   tile_exact_512<2, 4>};
  static const ExactTile four[2] = {tile_exact_512<4, 1>, tile_exact_512<4, 2>};
  return C == 4 ? four[R - 1] : C == 2 ? two[R - 1] : one[R - 1];
}

// Weight rows [j0, j1) against M activation rows through those tiles (the exact variant, AVX-512).
void rows_exact_512(int64_t t, const uint8_t* w, int64_t j0, int64_t j1, int64_t k, const float* x, int64_t m,
                    float* out, int64_t ldo, const float* bias, bool accumulate) {
  const int64_t nb = k / QK, row = nb * block_bytes(t);
  const int rb = m >= 8 ? 8 : (int)m;
  const int cw = rb <= 2 ? 4 : rb <= 4 ? 2 : 1;
  const bool q4 = (t == Q4_0 || t == Q4_1) && m <= 16;  // the table-lookup tiles, activations permuted
  thread_local std::vector<float> xperm;
  if (q4) {
    if ((int64_t)xperm.size() < m * k) xperm.resize(m * k);
    for (int64_t r = 0; r < m; ++r) q4_permute(x + r * k, nb, xperm.data() + r * k);
  }
  float res[8 * 4];
  const float* xs[8];
  for (int64_t j = j0; j < j1;) {
    const int C = j + cw <= j1 ? cw : 1;
    for (int64_t r0 = 0; r0 < m; r0 += rb) {
      const int R = (int)std::min<int64_t>(rb, m - r0);
      for (int r = 0; r < R; ++r) xs[r] = (q4 ? xperm.data() : x) + (r0 + r) * k;
      (q4 ? q4_tile_512(C, R) : exact_tile_512(C, R))(t, w + j * row, row, xs, nb, res);
      for (int c = 0; c < C; ++c) {
        const float b = bias ? bias[j + c] : 0.f;
        for (int r = 0; r < R; ++r) {
          float& o = out[(r0 + r) * ldo + j + c];
          o = accumulate ? o + res[c * R + r] + b : res[c * R + r] + b;
        }
      }
    }
    j += C;
  }
}
#endif

template <int ISA>
void rows_k(int64_t t, const uint8_t* w, int64_t j0, int64_t j1, int64_t k, const float* x, int64_t m,
            float* out, int64_t ldo, const float* bias, bool accumulate);

template <int ISA>
void dequant_row(int64_t t, const uint8_t* w, int64_t k, float* out);

int64_t row_bytes(int64_t t, int64_t k) { return k / block_values(t) * block_bytes(t); }

enum class Isa : int64_t { portable = 0, avx2 = 1, avx512vnni = 2 };

bool has_avx2() {
#ifdef LLMOS_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

bool has_vnni512() {
#ifdef LLMOS_X86
  static const bool ok = has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

Isa pick(int64_t isa) {   // -1: the best this CPU has
  if (isa < 0) return has_vnni512() ? Isa::avx512vnni : has_avx2() ? Isa::avx2 : Isa::portable;
  TORCH_CHECK(isa == 0 || (isa == 1 && has_avx2()) || (isa == 2 && has_vnni512()), "isa ", isa,
              " is not available on this CPU");
  return (Isa)isa;
}

void check(const torch::Tensor& w, int64_t t, int64_t n, int64_t k) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kUInt8 && w.is_contiguous(),
              "packed weights must be a contiguous uint8 CPU tensor");
  const int64_t bv = block_values(t);
  TORCH_CHECK(k % bv == 0, "the row length ", k, " is not a multiple of the block size ", bv);
  TORCH_CHECK(w.numel() == n * row_bytes(t, k), "packed weights hold ", w.numel(), " bytes, ", n,
              " rows of ", k, " need ", n * row_bytes(t, k));
}

// Weight rows [j0, j1) against M activation rows, 4 at a time while the weight row sits in
// L1: out[r * ldo + j] = (or +=, with accumulate) dot(w_j, x_r) (+ bias[j]).
template <int ISA>   // 0 portable, 1 AVX2, 2 AVX-512 VNNI (int8; exact uses AVX2)
void rows_dot(int64_t t, const uint8_t* w, int64_t j0, int64_t j1, int64_t k, const float* x, const ActBlock* act,
              int64_t m, bool int8, float* out, int64_t ldo, const float* bias, bool accumulate) {
  if (is_k(t)) {   // the K-quants: exact only (activations stay float32)
    rows_k<ISA>(t, w, j0, j1, k, x, m, out, ldo, bias, accumulate);
    return;
  }
#ifdef LLMOS_X86
  if (ISA == 2 && !int8) {
    rows_exact_512(t, w, j0, j1, k, x, m, out, ldo, bias, accumulate);
    return;
  }
#endif
  const int64_t nb = k / QK, row = nb * block_bytes(t);
  float res[4];
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* wr = w + j * row;
    for (int64_t r0 = 0; r0 < m; r0 += 4) {
      const int R = (int)std::min<int64_t>(4, m - r0);
      if (ISA == 0) {
        for (int r = 0; r < R; ++r)
          res[r] = int8 ? dot_int8_portable(t, wr, act + (r0 + r) * nb, nb) : dot_exact_portable(t, wr, x + (r0 + r) * k, nb);
      }
#ifdef LLMOS_X86
      else if (int8) {
        const ActBlock* a[4];
        for (int r = 0; r < R; ++r) a[r] = act + (r0 + r) * nb;
        if (ISA == 2) {
          switch (R) {
            case 1: dot_int8_vnni<1>(t, wr, a, nb, res); break;
            case 2: dot_int8_vnni<2>(t, wr, a, nb, res); break;
            case 3: dot_int8_vnni<3>(t, wr, a, nb, res); break;
            default: dot_int8_vnni<4>(t, wr, a, nb, res); break;
          }
        } else switch (R) {
          case 1: dot_int8_avx2<1>(t, wr, a, nb, res); break;
          case 2: dot_int8_avx2<2>(t, wr, a, nb, res); break;
          case 3: dot_int8_avx2<3>(t, wr, a, nb, res); break;
          default: dot_int8_avx2<4>(t, wr, a, nb, res); break;
        }
      } else {
        const float* xs[4];
        for (int r = 0; r < R; ++r) xs[r] = x + (r0 + r) * k;
        if (ISA == 2) {
          switch (R) {
            case 1: dot_exact_512<1>(t, wr, xs, nb, res); break;
            case 2: dot_exact_512<2>(t, wr, xs, nb, res); break;
            case 3: dot_exact_512<3>(t, wr, xs, nb, res); break;
            default: dot_exact_512<4>(t, wr, xs, nb, res); break;
          }
        } else switch (R) {
          case 1: dot_exact_avx2<1>(t, wr, xs, nb, res); break;
          case 2: dot_exact_avx2<2>(t, wr, xs, nb, res); break;
          case 3: dot_exact_avx2<3>(t, wr, xs, nb, res); break;
          default: dot_exact_avx2<4>(t, wr, xs, nb, res); break;
        }
      }
#endif
      const float b = bias ? bias[j] : 0.f;
      for (int r = 0; r < R; ++r) {
        float& o = out[(r0 + r) * ldo + j];
        o = accumulate ? o + res[r] + b : res[r] + b;
      }
    }
  }
}

void quantize_act(bool avx, const float* x, int64_t nb, ActBlock* out) {
#ifdef LLMOS_X86
  if (avx) { quantize_act_avx2(x, nb, out); return; }
#endif
  quantize_act_portable(x, nb, out);
}

// m activation rows quantized to 8 bits a block, the rows shared over torch's threads.
std::vector<ActBlock> quantize_rows(const float* x, int64_t m, int64_t k, bool avx) {
  const int64_t nb = k / QK;
  std::vector<ActBlock> act(m * nb);
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) quantize_act(avx, x + r * k, nb, act.data() + r * nb);
  });
  return act;
}

// ---------------------------------------------------------------------------------------------
// Panels: the int8-activation layout for AVX-512 VNNI. Sixteen weight rows are interleaved so
// that one vpdpbusd advances sixteen rows by four weights each against four activation bytes
// broadcast to every lane: no horizontal sums, and a block's unpacking (two instructions per
// 64 nibble bytes) is shared by every token of the step. Per panel and block:
//   Q4_0 / Q4_1: 4 x 64 bytes; register j, lane l (row l), byte i: low nibble q[l][8j + i],
//                high nibble q[l][8j + 4 + i]
//   Q8_0:        8 x 64 bytes; register u, lane l, byte i: q[l][4u + i] + 128
// then 16 fp16 scales d and 16 fp16 offsets m (Q4_1's m, Q4_0's -8d, Q8_0's -128d: powers of
// two times d, exact in fp16), so that dot(w_l, x) = sum over blocks of
// d_l d_x dot_u(q_l, q_x) + m_l s_x (ActBlock: x ~= d_x q_x, s_x = d_x sum(q_x)). Rows past n
// are zero. As many bytes as Q4_1 (Q4_0: half a bit a weight more, Q8_0: 9 bits against 8.5);
// kept beside the GGUF rows, which the exact variant, the GEMM paths and the embedding read.
constexpr int PANEL = 16;

int64_t panel_weight_bytes(int64_t t) { return t == Q8_0 ? 512 : 256; }
int64_t panel_block_bytes(int64_t t) { return panel_weight_bytes(t) + 4 * PANEL; }

torch::Tensor repack_panels(torch::Tensor w, int64_t t, int64_t n, int64_t k) {
  TORCH_CHECK(t == Q4_0 || t == Q4_1 || t == Q8_0, "panels hold Q4_0, Q4_1 or Q8_0 weights, not type ", t);
  check(w, t, n, k);
  const int64_t nb = k / QK, np = (n + PANEL - 1) / PANEL, pbb = panel_block_bytes(t), row = row_bytes(t, k);
  const int64_t bs = block_bytes(t), wb = panel_weight_bytes(t);
  auto out = torch::zeros({np * nb * pbb}, torch::kUInt8);
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  std::atomic<bool> inexact{false};
  at::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t b = 0; b < nb; ++b) {
        uint8_t* o = dst + (p * nb + b) * pbb;
        uint16_t* dm = reinterpret_cast<uint16_t*>(o + wb);   // 16 d, then 16 m
        for (int l = 0; l < PANEL && p * PANEL + l < n; ++l) {
          const uint8_t* blk = src + (p * PANEL + l) * row + b * bs;
          uint16_t dh, mh;
          std::memcpy(&dh, blk, 2);
          const float d = half_to_float(dh);
          int q[QK];
          if (t == Q8_0) {
            for (int i = 0; i < QK; ++i) q[i] = (int8_t)blk[2 + i];
            mh = float_to_half(-128.f * d);
            if (half_to_float(mh) != -128.f * d) inexact = true;
            for (int u = 0; u < 8; ++u)
              for (int i = 0; i < 4; ++i) o[u * 64 + l * 4 + i] = (uint8_t)(q[4 * u + i] + 128);
          } else {
            const uint8_t* qs = blk + (t == Q4_1 ? 4 : 2);
            for (int i = 0; i < 16; ++i) { q[i] = qs[i] & 0x0F; q[i + 16] = qs[i] >> 4; }
            if (t == Q4_1) {
              std::memcpy(&mh, blk + 2, 2);
            } else {
              mh = float_to_half(-8.f * d);
              if (half_to_float(mh) != -8.f * d) inexact = true;
            }
            for (int j = 0; j < 4; ++j)
              for (int i = 0; i < 4; ++i) o[j * 64 + l * 4 + i] = (uint8_t)(q[8 * j + i] | (q[8 * j + 4 + i] << 4));
          }
          dm[l] = dh;
          dm[PANEL + l] = mh;
        }
      }
  });
  TORCH_CHECK(!inexact, "a block scale is too large for the panel layout's fp16 offset");
  return out;
}

#ifdef LLMOS_X86
// R tokens (1..8) against one panel over nb blocks: res[r * 16 + l] = dot(w_l, x_r).
template <bool Q8, int R>
VNNI void panel_tile(const uint8_t* p, int64_t nb, const ActBlock* a, int64_t lda, float* res) {
  constexpr int64_t WB = Q8 ? 512 : 256, PBB = WB + 4 * PANEL;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, p += PBB) {
    for (int64_t off = 0; off < PBB; off += 64) _mm_prefetch((const char*)(p + PREFETCH + off), _MM_HINT_T0);
    __m512i u[8];
    if constexpr (Q8) {
      for (int v = 0; v < 8; ++v) u[v] = _mm512_loadu_si512(p + 64 * v);
    } else {
      for (int j = 0; j < 4; ++j) {
        const __m512i z = _mm512_loadu_si512(p + 64 * j);
        u[2 * j] = _mm512_and_si512(z, low);
        u[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(z, 4), low);
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + WB)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + WB + 2 * PANEL)));
    for (int r = 0; r < R; ++r) {
      const ActBlock& x = a[r * lda + b];
      int32_t xq[8];
      std::memcpy(xq, x.qs, QK);
      __m512i i0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[0], _mm512_set1_epi32(xq[0]));
      __m512i i1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[1], _mm512_set1_epi32(xq[1]));
      for (int v = 2; v < 8; v += 2) {
        i0 = _mm512_dpbusd_epi32(i0, u[v], _mm512_set1_epi32(xq[v]));
        i1 = _mm512_dpbusd_epi32(i1, u[v + 1], _mm512_set1_epi32(xq[v + 1]));
      }
      const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1)), _mm512_set1_ps(x.d));
      acc[r] = _mm512_fmadd_ps(f, d, acc[r]);
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(x.s), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(res + r * PANEL, acc[r]);
}

using PanelTile = void (*)(const uint8_t*, int64_t, const ActBlock*, int64_t, float*);
constexpr int PANEL_TOKENS = 8;   // tokens a tile: 8 accumulators beside the 8 unpacked registers

template <bool Q8, int... R>
PanelTile panel_tile_for(int r, std::integer_sequence<int, R...>) {
  static const PanelTile tiles[] = {panel_tile<Q8, R + 1>...};
  return tiles[r - 1];
}

// Panels [p0, p1) of an n-row matrix against m tokens' quantized activations (nb blocks a token):
// out[r, j] (row stride ldo) = (accumulate ? out : 0) + dot(w_j, x_r) + bias[j].
void panel_rows(int64_t t, const uint8_t* w, int64_t p0, int64_t p1, int64_t n, int64_t k, const ActBlock* act,
                int64_t m, float* out, int64_t ldo, const float* bias, bool accumulate) {
  const int64_t nb = k / QK, pbb = panel_block_bytes(t);
  alignas(64) float res[PANEL_TOKENS * PANEL];
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t j0 = p * PANEL, rows = std::min<int64_t>(PANEL, n - j0);
    for (int64_t r0 = 0; r0 < m; r0 += PANEL_TOKENS) {
      const int R = (int)std::min<int64_t>(PANEL_TOKENS, m - r0);
      const auto seq = std::make_integer_sequence<int, PANEL_TOKENS>{};
      (t == Q8_0 ? panel_tile_for<true>(R, seq) : panel_tile_for<false>(R, seq))(w + p * nb * pbb, nb,
                                                                                act + r0 * nb, nb, res);
      for (int r = 0; r < R; ++r) {
        float* o = out + (r0 + r) * ldo + j0;
        for (int64_t l = 0; l < rows; ++l) {
          const float v = res[r * PANEL + l] + (bias ? bias[j0 + l] : 0.f);
          o[l] = accumulate ? o[l] + v : v;
        }
      }
    }
  }
}
#endif

// x [M, K] @ the panels of a packed [N, K] matrix (int8 activations, AVX-512 VNNI).
torch::Tensor matmul_panels(torch::Tensor x, torch::Tensor panels, int64_t t, int64_t n, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.scalar_type() == torch::kFloat32,
              "activations must be float32 [M, ", k, "]");
  TORCH_CHECK(has_vnni512(), "panels need AVX-512 VNNI");
  TORCH_CHECK(t == Q4_0 || t == Q4_1 || t == Q8_0, "panels hold Q4_0, Q4_1 or Q8_0 weights, not type ", t);
  const int64_t nb = k / QK, np = (n + PANEL - 1) / PANEL;
  TORCH_CHECK(k % QK == 0 && panels.scalar_type() == torch::kUInt8 && panels.is_contiguous() &&
                  panels.numel() == np * nb * panel_block_bytes(t),
              "panels must be the contiguous uint8 repacking of a [", n, ", ", k, "] matrix");
  x = x.contiguous();
  const int64_t m = x.size(0);
  auto out = torch::empty({m, n}, x.options());
#ifdef LLMOS_X86
  const std::vector<ActBlock> act = quantize_rows(x.data_ptr<float>(), m, k, true);
  const uint8_t* wp = panels.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
    panel_rows(t, wp, p0, p1, n, k, act.data(), m, op, n, nullptr, false);
  });
#endif
  return out;
}

// ---------------------------------------------------------------------------------------------
// Entry points.

// x [M, K] float32 times packed w [N rows of K]^T -> [M, N]. int8: activations quantized first.
torch::Tensor matmul(torch::Tensor x, torch::Tensor w, int64_t t, int64_t n, int64_t k, bool int8, int64_t isa) {
  check(w, t, n, k);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.scalar_type() == torch::kFloat32,
              "activations must be float32 [M, ", k, "]");
  x = x.contiguous();
  const Isa use = pick(isa);
  const bool avx = use != Isa::portable;
  int8 = int8 && !is_k(t);
  const int64_t m = x.size(0), row = row_bytes(t, k);
  auto out = torch::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const std::vector<ActBlock> act = int8 ? quantize_rows(xp, m, k, avx) : std::vector<ActBlock>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(row, 1));
  at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
    if (use == Isa::avx512vnni) rows_dot<2>(t, wp, n0, n1, k, xp, act.data(), m, int8, op, n, nullptr, false);
    else if (use == Isa::avx2) rows_dot<1>(t, wp, n0, n1, k, xp, act.data(), m, int8, op, n, nullptr, false);
    else rows_dot<0>(t, wp, n0, n1, k, xp, act.data(), m, int8, op, n, nullptr, false);
  });
  return out;
}

// Packed rows -> float32 [N, K], into `out` when given (a reused buffer), else a new tensor.
torch::Tensor dequantize(torch::Tensor w, int64_t t, int64_t n, int64_t k, c10::optional<torch::Tensor> out_,
                         int64_t isa) {
  check(w, t, n, k);
  const Isa use = pick(isa);
  torch::Tensor out = out_.has_value() ? *out_ : torch::empty({n, k}, torch::kFloat32);
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == torch::kFloat32 && out.numel() == n * k,
              "out must be a contiguous float32 tensor of ", n * k, " values");
  const int64_t row = row_bytes(t, k);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, 8192 / k), [&](int64_t n0, int64_t n1) {
    for (int64_t j = n0; j < n1; ++j) {
#ifdef LLMOS_X86
      if (use == Isa::avx512vnni) { dequant_row<2>(t, wp + j * row, k, op + j * k); continue; }
      if (use == Isa::avx2) { dequant_row<1>(t, wp + j * row, k, op + j * k); continue; }
#endif
      dequant_row<0>(t, wp + j * row, k, op + j * k);
    }
  });
  return out.view({n, k});
}

// float32 [N, K] -> packed rows, llama.cpp's reference rounding (ggml quantize_row_*_ref).
torch::Tensor quantize(torch::Tensor x, int64_t t) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "quantize wants a float32 matrix");
  const int64_t n = x.size(0), k = x.size(1);
  TORCH_CHECK(k % QK == 0, "the row length ", k, " is not a multiple of the block size ", QK);
  x = x.contiguous();
  const int64_t nb = k / QK, bs = block_bytes(t);
  auto out = torch::empty({n, nb * bs}, torch::kUInt8);
  const float* xp = x.data_ptr<float>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, n * nb, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      const float* xb = xp + i * QK;
      uint8_t* ob = op + i * bs;
      uint16_t h;
      if (t == Q8_0) {
        float amax = 0.f;
        for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xb[j]));
        const float d = amax / 127.f, id = d ? 1.f / d : 0.f;
        h = float_to_half(d);
        std::memcpy(ob, &h, 2);
        for (int j = 0; j < QK; ++j) ob[2 + j] = (uint8_t)(int8_t)std::nearbyint(xb[j] * id);
      } else if (t == Q4_0) {
        float amax = 0.f, mx = 0.f;                // the value of largest magnitude maps to -8
        for (int j = 0; j < QK; ++j)
          if (std::fabs(xb[j]) > amax) { amax = std::fabs(xb[j]); mx = xb[j]; }
        const float d = mx / -8.f, id = d ? 1.f / d : 0.f;
        h = float_to_half(d);
        std::memcpy(ob, &h, 2);
        for (int j = 0; j < QK / 2; ++j) {
          const int a = std::min(15, (int)(xb[j] * id + 8.5f)), b = std::min(15, (int)(xb[j + QK / 2] * id + 8.5f));
          ob[2 + j] = (uint8_t)(a | (b << 4));
        }
      } else {
        TORCH_CHECK(t == Q4_1, "unsupported packed type ", t);
        float lo = xb[0], hi = xb[0];
        for (int j = 1; j < QK; ++j) { lo = std::min(lo, xb[j]); hi = std::max(hi, xb[j]); }
        const float d = (hi - lo) / 15.f, id = d ? 1.f / d : 0.f;
        h = float_to_half(d);
        std::memcpy(ob, &h, 2);
        h = float_to_half(lo);
        std::memcpy(ob + 2, &h, 2);
        for (int j = 0; j < QK / 2; ++j) {
          const int a = std::min(15, (int)((xb[j] - lo) * id + 0.5f));
          const int b = std::min(15, (int)((xb[j + QK / 2] - lo) * id + 0.5f));
          ob[4 + j] = (uint8_t)(a | (b << 4));
        }
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// A decode step through every layer in one call.
//
// A one-token step does little work per operation, so launching ~15 PyTorch ops and 4
// matmuls per layer (each a parallel region that wakes the thread pool) costs more than the
// arithmetic. Here one parallel region runs the whole stack: the threads split each matmul's
// weight rows and the attention's (token, KV head) pairs, and meet at a spinning barrier
// between the steps that need each other's results. The small serial steps (RMSNorm, SiLU*up,
// activation quantization) each thread computes for itself, which is cheaper than a barrier.
// The threads spin only inside the step, while all of them have work.

// Dot product and y += a * x over one attention head's D floats.
template <int ISA>
inline float vdot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <int ISA>
inline void vaxpy(float* y, float a, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

#ifdef LLMOS_X86
template <>
AVX2 inline float vdot<1>(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <>
AVX2 inline void vaxpy<1>(float* y, float a, const float* x, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

template <>
VNNI inline float vdot<2>(const float* a, const float* b, int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
  }
  for (; i + 16 <= n; i += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
  float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <>
VNNI inline void vaxpy<2>(float* y, float a, const float* x, int64_t n) {
  const __m512 av = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}
#endif

// A K-quant super-block decoded by the portable code, compiled for each ISA (the compiler
// vectorizes its loops for the wider registers).
template <int ISA>
inline void dequant_super_isa(int64_t t, const uint8_t* w, float* out) { dequant_super(t, w, out); }
#ifdef LLMOS_X86
template <>
AVX2 void dequant_super_isa<1>(int64_t t, const uint8_t* w, float* out) { dequant_super(t, w, out); }
// 16 unsigned bytes (already masked to their bits) -> 16 floats: scale * (q - sub) - min.
VNNI inline void k_store16(__m128i q, __m512 scale, __m512 min, __m512i sub, float* out) {
  const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(q), sub));
  _mm512_storeu_ps(out, _mm512_fmsub_ps(scale, v, min));
}

template <>
VNNI void dequant_super_isa<2>(int64_t t, const uint8_t* w, float* out) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  if (t == Q6_K) {
    const uint8_t *ql = w, *qh = w + 128;
    const int8_t* sc = (const int8_t*)(w + 192);
    const float d = h2f(w + 208);
    const __m256i m2 = _mm256_set1_epi8(0x03);
    const __m512i sub = _mm512_set1_epi32(32);
    const __m512 zero = _mm512_setzero_ps();
    for (int h = 0; h < 2; ++h) {
      const __m256i hi = _mm256_loadu_si256((const __m256i*)(qh + 32 * h));
      for (int g = 0; g < 4; ++g) {
        const __m256i lo = _mm256_loadu_si256((const __m256i*)(ql + 64 * h + 32 * (g % 2)));
        const __m256i l4 = _mm256_and_si256(_mm256_srl_epi16(lo, _mm_cvtsi32_si128(4 * (g / 2))), m4);
        const __m256i h2 = _mm256_and_si256(_mm256_srl_epi16(hi, _mm_cvtsi32_si128(2 * g)), m2);
        const __m256i q = _mm256_or_si256(l4, _mm256_slli_epi16(h2, 4));   // 0..63, no carries between bytes
        float* o = out + 128 * h + 32 * g;
        // (d * sc) * (q - 32), as gguf-py rounds it: the product first, then no subtraction.
        k_store16(_mm256_castsi256_si128(q), _mm512_set1_ps(d * (float)sc[8 * h + 2 * g]), zero, sub, o);
        k_store16(_mm256_extracti128_si256(q, 1), _mm512_set1_ps(d * (float)sc[8 * h + 2 * g + 1]), zero, sub,
                  o + 16);
      }
    }
    return;
  }
  const float d = h2f(w), dmin = h2f(w + 2);
  const uint8_t* sc = w + 4;
  const __m512i none = _mm512_setzero_si512();
  const __m256i qh = t == Q5_K ? _mm256_loadu_si256((const __m256i*)(w + 16)) : _mm256_setzero_si256();
  const uint8_t* qs = w + (t == Q5_K ? 48 : 16);
  for (int j = 0; j < 8; ++j) {
    int s, m;
    k_scale_min(sc, j, s, m);
    const __m512 ds = _mm512_set1_ps(d * (float)s), dm = _mm512_set1_ps(dmin * (float)m);
    const __m256i raw = _mm256_loadu_si256((const __m256i*)(qs + 32 * (j / 2)));
    __m256i q = _mm256_and_si256(_mm256_srl_epi16(raw, _mm_cvtsi32_si128(4 * (j % 2))), m4);
    if (t == Q5_K) {
      const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(j)), _mm256_set1_epi8(1));
      q = _mm256_or_si256(q, _mm256_slli_epi16(bit, 4));
    }
    k_store16(_mm256_castsi256_si128(q), ds, dm, none, out + 32 * j);
    k_store16(_mm256_extracti128_si256(q, 1), ds, dm, none, out + 32 * j + 16);
  }
}
#endif

// One packed row of k weights to float32.
template <int ISA>
void dequant_row(int64_t t, const uint8_t* w, int64_t k, float* out) {
  const int64_t bs = block_bytes(t);
  if (is_k(t)) {
    for (int64_t b = 0; b < k / QK_K; ++b) dequant_super_isa<ISA>(t, w + b * bs, out + b * QK_K);
    return;
  }
#ifdef LLMOS_X86
  if (ISA > 0) {
    dequant_row_avx2(t, w, k / QK, out);
    return;
  }
#endif
  for (int64_t b = 0; b < k / QK; ++b) dequant_block(t, w + b * bs, out + b * QK);
}

// K-quant rows against m activation rows: each super-block decoded once into a buffer in L1,
// then dotted with every activation row's matching 256 values.
template <int ISA>
void rows_k(int64_t t, const uint8_t* w, int64_t j0, int64_t j1, int64_t k, const float* x, int64_t m,
            float* out, int64_t ldo, const float* bias, bool accumulate) {
  const int64_t nb = k / QK_K, bs = block_bytes(t), row = nb * bs;
  alignas(64) float buf[QK_K];
  thread_local std::vector<float> acc;
  acc.resize(m);
  for (int64_t j = j0; j < j1; ++j) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t b = 0; b < nb; ++b) {
      dequant_super_isa<ISA>(t, w + j * row + b * bs, buf);
      for (int64_t r = 0; r < m; ++r) acc[r] += vdot<ISA>(buf, x + r * k + b * QK_K, QK_K);
    }
    const float bj = bias ? bias[j] : 0.f;
    for (int64_t r = 0; r < m; ++r) {
      float& o = out[r * ldo + j];
      o = accumulate ? o + acc[r] + bj : acc[r] + bj;
    }
  }
}

#ifdef LLMOS_X86
// e^x, 16 lanes (x below -87 as -87; above 88, infinity): x = n ln2 + r with |r| <= ln2/2,
// e^r by its degree-6 Taylor polynomial (error below float's rounding there), times 2^n by
// vscalefps. About 1 ulp from std::exp.
VNNI inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);   // ln2 in two parts: exact n*hi
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// Softmax of n scores in place (n >= 1), AVX-512.
VNNI inline void softmax512(float* x, int64_t n) {
  __m512 mv = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(x + i));
  float m = _mm512_reduce_max_ps(mv);
  for (; i < n; ++i) m = std::max(m, x[i]);
  const __m512 mb = _mm512_set1_ps(m);
  __m512 sv = _mm512_setzero_ps();
  for (i = 0; i + 16 <= n; i += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), mb));
    _mm512_storeu_ps(x + i, e);
    sv = _mm512_add_ps(sv, e);
  }
  if (i < n) {
    const __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), mb));
    _mm512_mask_storeu_ps(x + i, k, e);
    sv = _mm512_add_ps(sv, _mm512_maskz_mov_ps(k, e));
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sv));
  for (i = 0; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), inv));
  for (; i < n; ++i) x[i] *= _mm512_cvtss_f32(inv);
}

// Lane i of the result = the sum of a[i]'s 16 lanes: the dot products of 16 positions finished
// together, in 15 steps of two permutes and an add (one reduce_add a position takes about 8).
// Step w (8, 4, 2, 1) pairs vectors that each hold partial sums in runs of 2w lanes and adds
// each run's halves, so a pair becomes one vector with runs of w lanes.
VNNI inline __m512 hsum16(__m512* a) {
  int n = 16;
  for (int w = 8; w >= 1; w /= 2) {
    alignas(64) int lo[16];
    for (int i = 0, c = 0; c < 32; ++c)
      if (c % (2 * w) < w) lo[i++] = c;
    const __m512i il = _mm512_load_si512(lo), ih = _mm512_add_epi32(il, _mm512_set1_epi32(w));
    for (int i = 0; i < n / 2; ++i)
      a[i] = _mm512_add_ps(_mm512_permutex2var_ps(a[2 * i], il, a[2 * i + 1]),
                           _mm512_permutex2var_ps(a[2 * i], ih, a[2 * i + 1]));
    n /= 2;
  }
  return a[0];
}

// o[h][D] = sum_p w[h][p] * v_p for NH heads of one KV group over a paged context: each cached
// value is read once for all of them, the sums in registers (D = 16 NV).
template <int NV, int NH>
VNNI inline void pv512(const float* w, int64_t L, const float* const* rows, float* o) {
  __m512 acc[NH][NV];
  for (int h = 0; h < NH; ++h)
    for (int i = 0; i < NV; ++i) acc[h][i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < L; ++p) {
    const float* v = rows[p];
    __m512 vv[NV];
    for (int i = 0; i < NV; ++i) vv[i] = _mm512_loadu_ps(v + 16 * i);
    for (int h = 0; h < NH; ++h) {
      const __m512 wp = _mm512_set1_ps(w[h * L + p]);
      for (int i = 0; i < NV; ++i) acc[h][i] = _mm512_fmadd_ps(wp, vv[i], acc[h][i]);
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(o + h * 16 * NV + 16 * i, acc[h][i]);
}

// pv512 for `heads` (1..NH) heads.
template <int NV, int NH>
VNNI inline void pv512_upto(int64_t heads, const float* w, int64_t L, const float* const* rows, float* o) {
  if constexpr (NH > 1) {
    if (heads < NH) return pv512_upto<NV, NH - 1>(heads, w, L, rows, o);
  }
  pv512<NV, NH>(w, L, rows, o);
}

// n query heads (consecutive, q and o [n, D]) of one KV group attending over L cached
// positions, whose keys and values start at krows[p] and vrows[p]. sc: [n, L] scratch.
template <int NV>
VNNI void attend512(int64_t n, const float* q, const float* const* krows, const float* const* vrows, int64_t L,
                    float scale, float* sc, float* o) {
  constexpr int D = 16 * NV;
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t p0 = 0; p0 < L; p0 += 16) {
    const int cnt = (int)std::min<int64_t>(16, L - p0);
    const float* const* kp = krows + p0;
    // The cache rows are scattered over the pool (a few hundred bytes each, a KV group apart):
    // ask for the next run's keys and this run's values (read after the softmax, from L2) now.
    const int next = (int)std::min<int64_t>(16, std::max<int64_t>(0, L - p0 - 16));
    for (int j = 0; j < next; ++j)
      for (int i = 0; i < NV; ++i) _mm_prefetch((const char*)(kp[16 + j] + 16 * i), _MM_HINT_T0);
    for (int j = 0; j < cnt; ++j)
      for (int i = 0; i < NV; ++i) _mm_prefetch((const char*)(vrows[p0 + j] + 16 * i), _MM_HINT_T1);
    for (int64_t r = 0; r < n; ++r) {
      __m512 qv[NV];
      for (int i = 0; i < NV; ++i) qv[i] = _mm512_loadu_ps(q + r * D + 16 * i);
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) {
        __m512 a = _mm512_setzero_ps();
        if (j < cnt)
          for (int i = 0; i < NV; ++i) a = _mm512_fmadd_ps(qv[i], _mm512_loadu_ps(kp[j] + 16 * i), a);
        acc[j] = a;
      }
      _mm512_mask_storeu_ps(sc + r * L + p0, (__mmask16)((1u << cnt) - 1), _mm512_mul_ps(hsum16(acc), sv));
    }
  }
  for (int64_t r = 0; r < n; ++r) softmax512(sc + r * L, L);
  constexpr int most = NV <= 4 ? 4 : 2;      // accumulators NH x NV within the 32 registers
  for (int64_t r = 0; r < n; r += most) pv512_upto<NV, most>(std::min<int64_t>(most, n - r), sc + r * L, L, vrows,
                                                             o + r * D);
}

VNNI inline bool attend512_any(int64_t D, int64_t n, const float* q, const float* const* krows,
                               const float* const* vrows, int64_t L, float scale, float* sc, float* o) {
  switch (D) {
    case 32: attend512<2>(n, q, krows, vrows, L, scale, sc, o); return true;
    case 64: attend512<4>(n, q, krows, vrows, L, scale, sc, o); return true;
    case 80: attend512<5>(n, q, krows, vrows, L, scale, sc, o); return true;
    case 96: attend512<6>(n, q, krows, vrows, L, scale, sc, o); return true;
    case 128: attend512<8>(n, q, krows, vrows, L, scale, sc, o); return true;
  }
  return false;
}

// act = silu(gate) * up over n values, AVX-512.
VNNI inline void silu_mul512(const float* g, const float* u, float* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.f);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 gv = _mm512_loadu_ps(g + i);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
  }
  for (; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}
#endif

// Weight rows [j0, j1) times M activation rows by the BLAS GEMM, a few dozen rows at a time
// dequantized into `tile` (sized to stay in L2) and multiplied while still there, by one
// thread (callers split the rows over their threads). Reading a weight once for many tokens,
// the GEMM's register blocking beats the packed kernels, which dequantize a block once per
// few tokens; and unlike dequantizing a whole matrix first, the floats never reach memory.
// out[r, j] (row stride ldo) = (accumulate ? out : 0) + in[r] . w[j] + bias[j].
template <int ISA>
void gemm_rows(const float* in, int64_t M, int64_t k, const uint8_t* wp, int64_t t, int64_t j0, int64_t j1,
               float* out, int64_t ldo, const float* bias, bool accumulate, std::vector<float>& tile) {
  const int64_t row = row_bytes(t, k);
  const int64_t chunk = std::max<int64_t>(16, std::min<int64_t>(GEMM_ROWS_MAX, (GEMM_TILE_FLOATS / k) / 16 * 16));
  if ((int64_t)tile.size() < chunk * k) tile.resize(chunk * k);
  const float one = 1.f, beta = accumulate ? 1.f : 0.f;
  const int K = (int)k, Mi = (int)M, LDO = (int)ldo;
  for (int64_t j = j0; j < j1; j += chunk) {
    const int64_t rows = std::min(chunk, j1 - j);
    for (int64_t r = 0; r < rows; ++r) dequant_row<ISA>(t, wp + (j + r) * row, k, tile.data() + r * k);
    // Column-major view: C[rows x M] (ld ldo) = tile^T' [rows x k] * in' [k x M].
    const int R = (int)rows;
    sgemm_("T", "N", &R, &Mi, &K, &one, tile.data(), &K, in, &K, &beta, out + j, &LDO);
    if (bias)
      for (int64_t r = 0; r < M; ++r)
        for (int64_t c = 0; c < rows; ++c) out[r * ldo + j + c] += bias[j + c];
  }
}

// x [M, k] @ packed w [n, k]^T for wide steps (prefill, the LM head of big batches): the
// threads split the weight rows, each through gemm_rows.
torch::Tensor gemm(torch::Tensor x, torch::Tensor w, int64_t t, int64_t n, int64_t k, int64_t isa) {
  check(w, t, n, k);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.scalar_type() == torch::kFloat32,
              "activations must be float32 [M, ", k, "]");
  TORCH_CHECK(sgemm_ != nullptr, "no BLAS sgemm_ in this torch build");
  x = x.contiguous();
  const int64_t m = x.size(0);
  auto out = torch::empty({m, n}, x.options());
  if (m == 0) return out;
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const Isa use = pick(isa);
  const int nt = std::max(1, std::min<int>(at::get_num_threads(), 64));
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), got = omp_get_num_threads();
    const int64_t j0 = n * tid / got, j1 = n * (tid + 1) / got;
    std::vector<float> tile;
#ifdef LLMOS_X86
    if (use == Isa::avx512vnni) gemm_rows<2>(xp, m, k, wp, t, j0, j1, op, n, nullptr, false, tile);
    else if (use == Isa::avx2) gemm_rows<1>(xp, m, k, wp, t, j0, j1, op, n, nullptr, false, tile);
    else
#endif
      gemm_rows<0>(xp, m, k, wp, t, j0, j1, op, n, nullptr, false, tile);
  }
  return out;
}

struct SpinBarrier {
  std::atomic<int> count{0}, generation{0};
  int n = 1;
  void wait() {
    const int gen = generation.load(std::memory_order_acquire);
    if (count.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      count.store(0, std::memory_order_relaxed);
      generation.fetch_add(1, std::memory_order_acq_rel);
      return;
    }
    for (int spins = 0; generation.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins < 20000) {
#ifdef LLMOS_X86
        _mm_pause();
#endif
      } else {
        std::this_thread::yield();   // the other thread was descheduled: give the core back
      }
    }
  }
};

struct Layer {
  torch::Tensor qkv, o, gate_up, down;    // packed rows
  int64_t t_qkv, t_o, t_gate_up, t_down;
  torch::Tensor in_norm, post_norm, qkv_bias;   // float32; qkv_bias may be undefined
  torch::Tensor p_qkv, p_o, p_gate_up, p_down;  // their panels (int8 activations), or undefined
};

class DecodeStack {
 public:
  DecodeStack(int64_t hidden, int64_t inter, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps)
      : hidden_(hidden), inter_(inter), H_(heads), KVH_(kv_heads), D_(head_dim), eps_((float)eps) {}

  void add_layer(torch::Tensor qkv, int64_t t_qkv, torch::Tensor o, int64_t t_o, torch::Tensor gate_up,
                 int64_t t_gate_up, torch::Tensor down, int64_t t_down, torch::Tensor in_norm,
                 torch::Tensor post_norm, c10::optional<torch::Tensor> qkv_bias, torch::Tensor k_cache,
                 torch::Tensor v_cache) {
    const int64_t q = (H_ + 2 * KVH_) * D_;
    check(qkv, t_qkv, q, hidden_);
    check(o, t_o, hidden_, H_ * D_);
    check(gate_up, t_gate_up, 2 * inter_, hidden_);
    check(down, t_down, hidden_, inter_);
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == torch::kFloat32,
                "KV caches must be contiguous float32 [slots, KVH, D]");
    Layer l{qkv, o, gate_up, down, t_qkv, t_o, t_gate_up, t_down, in_norm.contiguous(), post_norm.contiguous(),
            qkv_bias.has_value() ? qkv_bias->contiguous() : torch::Tensor()};
    layers_.push_back(l);
    k_.push_back(k_cache);
    v_.push_back(v_cache);
  }

  // The layer's matrices repacked as panels (repack_panels): int8-activation steps use them.
  void set_panels(int64_t li, torch::Tensor qkv, torch::Tensor o, torch::Tensor gate_up, torch::Tensor down) {
    TORCH_CHECK(li >= 0 && li < (int64_t)layers_.size(), "no layer ", li);
    TORCH_CHECK(has_vnni512(), "panels need AVX-512 VNNI");
    Layer& l = layers_[li];
    const int64_t q = (H_ + 2 * KVH_) * D_;
    auto ok = [](const torch::Tensor& p, int64_t t, int64_t n, int64_t k) {
      TORCH_CHECK((t == Q4_0 || t == Q4_1 || t == Q8_0) && p.scalar_type() == torch::kUInt8 && p.is_contiguous() &&
                      p.numel() == (n + PANEL - 1) / PANEL * (k / QK) * panel_block_bytes(t),
                  "panels do not match the layer's [", n, ", ", k, "] matrix of type ", t);
    };
    ok(qkv, l.t_qkv, q, hidden_);
    ok(o, l.t_o, hidden_, H_ * D_);
    ok(gate_up, l.t_gate_up, 2 * inter_, hidden_);
    ok(down, l.t_down, hidden_, inter_);
    l.p_qkv = qkv; l.p_o = o; l.p_gate_up = gate_up; l.p_down = down;
  }

  // x [T, hidden] (embedded decode tokens, one per sequence) -> the hidden state after the
  // last layer, in place. positions, slots, context_lens [T]; block_tables [T, max_blocks].
  torch::Tensor forward(torch::Tensor x, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
                        torch::Tensor slots, torch::Tensor block_tables, torch::Tensor context_lens,
                        int64_t block_size, double scale, bool int8, int64_t isa, int64_t gemm_min) {
    TORCH_CHECK(x.is_contiguous() && x.dim() == 2 && x.size(1) == hidden_, "x must be contiguous [T, hidden]");
    TORCH_CHECK(H_ % KVH_ == 0, "query heads must be a multiple of KV heads");
    block_tables = block_tables.contiguous();
    Step s{x.data_ptr<float>(), positions.data_ptr<int64_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
           slots.data_ptr<int64_t>(), block_tables.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(),
           x.size(0), block_tables.size(1), block_size, (float)scale, int8,
           gemm_min > 0 && x.size(0) >= gemm_min && sgemm_ != nullptr, nullptr, nullptr};
    const int64_t T = s.T;
    int64_t max_ctx = 1;
    for (int64_t t = 0; t < T; ++t) max_ctx = std::max(max_ctx, s.ctx[t]);
    std::vector<float> qkv(T * (H_ + 2 * KVH_) * D_), attn(T * H_ * D_), gu(T * 2 * inter_), act(T * inter_);
    s.act = act.data();
    std::vector<ActBlock> qa(int8 ? T * std::max({hidden_, inter_, H_ * D_}) / QK : 0);
    s.qa = qa.data();
    const Isa use = pick(isa);
    const int nt = std::max(1, std::min<int>(at::get_num_threads(), 64));
    SpinBarrier barrier;
    barrier.n = nt;
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num(), n = omp_get_num_threads();
      if (tid == 0 && n != nt) barrier.n = n;   // the runtime gave fewer threads than asked
#pragma omp barrier
      Scratch w(T, hidden_, inter_, H_ * D_, max_ctx, H_ / KVH_);
#ifdef LLMOS_X86
      if (use == Isa::avx512vnni) run_vnni(s, w, qkv.data(), attn.data(), gu.data(), tid, n, barrier);
      else if (use == Isa::avx2) run_avx2(s, w, qkv.data(), attn.data(), gu.data(), tid, n, barrier);
      else
#endif
        run<0>(s, w, qkv.data(), attn.data(), gu.data(), tid, n, barrier);
    }
    return x;
  }

 private:
  struct Step {
    float* x;
    const int64_t *pos;
    const float *cos, *sin;
    const int64_t *slots, *tables, *ctx;
    int64_t T, max_blocks, block_size;
    float scale;
    bool int8;
    bool gemm;   // big step: dequantized tiles through the BLAS GEMM
    float* act;  // [T, inter], shared by the threads
    ActBlock* qa;  // [T, blocks] quantized activations, shared by the threads (int8, big steps)
  };
  struct Scratch {    // one thread's own buffers
    std::vector<float> h, act, scores, tile;
    std::vector<ActBlock> qa;
    std::vector<const float*> rows;    // where each context position's key and value are
    Scratch(int64_t T, int64_t hidden, int64_t inter, int64_t hd, int64_t max_ctx, int64_t heads_per_group)
        : h(T * hidden), act(T * inter), scores(heads_per_group * max_ctx), qa(T * std::max({hidden, inter, hd}) / QK),
          rows(2 * max_ctx) {}
  };

  static std::pair<int64_t, int64_t> share(int64_t n, int tid, int nt) {
    return {n * tid / nt, n * (tid + 1) / nt};
  }

  void rmsnorm(const float* x, const float* w, float* out, int64_t T) const {
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x + t * hidden_;
      float ss = 0.f;
      for (int64_t i = 0; i < hidden_; ++i) ss += xt[i] * xt[i];
      const float r = 1.f / std::sqrt(ss / hidden_ + eps_);
      for (int64_t i = 0; i < hidden_; ++i) out[t * hidden_ + i] = xt[i] * r * w[i];
    }
  }

  template <int ISA>
  void gemm_share(const Step& s, Scratch& w, const float* in, int64_t k, const torch::Tensor& wt, int64_t t,
                  int64_t n, float* out, int64_t ldo, const float* bias, bool accumulate, int tid, int nt) const {
    const auto [j0, j1] = share(n, tid, nt);
    gemm_rows<ISA>(in, s.T, k, wt.data_ptr<uint8_t>(), t, j0, j1, out, ldo, bias, accumulate, w.tile);
  }

  template <int ISA>
  void matmul_share(const Step& s, Scratch& w, const float* in, int64_t k, const torch::Tensor& wt, int64_t t,
                    int64_t n, float* out, int64_t ldo, const float* bias, bool accumulate, int tid, int nt,
                    const torch::Tensor& panels, SpinBarrier& barrier) const {
    if (s.gemm) {
      gemm_share<ISA>(s, w, in, k, wt, t, n, out, ldo, bias, accumulate, tid, nt);
      return;
    }
    const ActBlock* qa = w.qa.data();
    if (s.int8 && !is_k(t)) {
      // Each thread quantizes every token for itself in small steps; big steps share that
      // out behind a barrier (64 tokens x 48 blocks would otherwise be done twice).
      const int64_t nb = k / QK;
      if (s.T >= SILU_SHARE_TOKENS) {
        const auto [r0, r1] = share(s.T, tid, nt);
        for (int64_t r = r0; r < r1; ++r) quantize_act(ISA > 0, in + r * k, nb, s.qa + r * nb);
        barrier.wait();
        qa = s.qa;
      } else {
        for (int64_t r = 0; r < s.T; ++r) quantize_act(ISA > 0, in + r * k, nb, w.qa.data() + r * nb);
      }
    }
#ifdef LLMOS_X86
    if (ISA == 2 && s.int8 && panels.defined()) {
      const auto [p0, p1] = share((n + PANEL - 1) / PANEL, tid, nt);
      panel_rows(t, panels.data_ptr<uint8_t>(), p0, p1, n, k, qa, s.T, out, ldo, bias, accumulate);
      return;
    }
#endif
    const auto [j0, j1] = share(n, tid, nt);
    rows_dot<ISA>(t, wt.data_ptr<uint8_t>(), j0, j1, k, in, qa, s.T, s.int8, out, ldo, bias, accumulate);
  }

  template <int ISA>
  void silu_rows(const float* gu, float* act, int64_t t0, int64_t t1) const {
    for (int64_t t = t0; t < t1; ++t) {
      const float* g = gu + t * 2 * inter_;
      float* o = act + t * inter_;
#ifdef LLMOS_X86
      if constexpr (ISA == 2) {
        silu_mul512(g, g + inter_, o, inter_);
        continue;
      }
#endif
      for (int64_t i = 0; i < inter_; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * g[inter_ + i];
    }
  }

  // RoPE on q heads [g*R, (g+1)*R) and k head g of token t; k and v into the cache.
  void rope_store(const Step& s, float* qkv, int64_t li, int64_t t, int64_t g) const {
    const int64_t R = H_ / KVH_, D = D_, half = D / 2, row = (H_ + 2 * KVH_) * D;
    float* xt = qkv + t * row;
    const float* c = s.cos + s.pos[t] * D;
    const float* sn = s.sin + s.pos[t] * D;
    auto rope = [&](float* v) {
      for (int64_t d = 0; d < half; ++d) {
        const float a = v[d], b = v[d + half];
        v[d] = a * c[d] - b * sn[d];
        v[d + half] = b * c[d + half] + a * sn[d + half];
      }
    };
    for (int64_t r = 0; r < R; ++r) rope(xt + (g * R + r) * D);
    float* kh = xt + (H_ + g) * D;
    rope(kh);
    std::copy(kh, kh + D, k_[li].data_ptr<float>() + (s.slots[t] * KVH_ + g) * D);
    std::copy(xt + (H_ + KVH_ + g) * D, xt + (H_ + KVH_ + g + 1) * D,
              v_[li].data_ptr<float>() + (s.slots[t] * KVH_ + g) * D);
  }

  // Query heads [h0, h1) of token t, all of KV group g, over the token's paged context (after
  // every rope_store of the step): each cached key and value is read once for those heads.
  template <int ISA>
  void attend(const Step& s, Scratch& w, const float* qkv, float* attn, int64_t li, int64_t t, int64_t g,
              int64_t h0, int64_t h1) const {
    const int64_t D = D_, row = (H_ + 2 * KVH_) * D, n = h1 - h0;
    const float* kc = k_[li].data_ptr<float>();
    const float* vc = v_[li].data_ptr<float>();
    const int64_t L = s.ctx[t];
    const int64_t* table = s.tables + t * s.max_blocks;
    float* sc = w.scores.data();                 // [n, L]
#ifdef LLMOS_X86
    if constexpr (ISA == 2) {
      if (D == 32 || D == 64 || D == 80 || D == 96 || D == 128) {   // attend512's register tiles
        const float** kr = w.rows.data();
        const float** vr = kr + L;
        for (int64_t p = 0, b = 0, off = 0; p < L; ++p) {
          const int64_t at = ((table[b] * s.block_size + off) * KVH_ + g) * D;
          kr[p] = kc + at;
          vr[p] = vc + at;
          if (++off == s.block_size) { off = 0; ++b; }
        }
        attend512_any(D, n, qkv + t * row + h0 * D, kr, vr, L, s.scale, sc, attn + (t * H_ + h0) * D);
        return;
      }
    }
#endif
    for (int64_t p = 0; p < L; ++p) {
      const float* k = kc + ((table[p / s.block_size] * s.block_size + p % s.block_size) * KVH_ + g) * D;
      for (int64_t r = 0; r < n; ++r) sc[r * L + p] = vdot<ISA>(qkv + t * row + (h0 + r) * D, k, D) * s.scale;
    }
    for (int64_t r = 0; r < n; ++r) {
      float* sr = sc + r * L;
      float m = -INFINITY, sum = 0.f;
      for (int64_t p = 0; p < L; ++p) m = std::max(m, sr[p]);
      for (int64_t p = 0; p < L; ++p) { sr[p] = std::exp(sr[p] - m); sum += sr[p]; }
      const float inv = 1.f / sum;
      for (int64_t p = 0; p < L; ++p) sr[p] *= inv;
      float* o = attn + (t * H_ + h0 + r) * D;
      std::fill(o, o + D, 0.f);
    }
    for (int64_t p = 0; p < L; ++p) {
      const float* v = vc + ((table[p / s.block_size] * s.block_size + p % s.block_size) * KVH_ + g) * D;
      for (int64_t r = 0; r < n; ++r) vaxpy<ISA>(attn + (t * H_ + h0 + r) * D, sc[r * L + p], v, D);
    }
  }

  template <int ISA>
  void run(const Step& s, Scratch& w, float* qkv, float* attn, float* gu, int tid, int nt,
           SpinBarrier& barrier) const {
    const int64_t T = s.T, qn = (H_ + 2 * KVH_) * D_, hd = H_ * D_;
    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& l = layers_[li];
      rmsnorm(s.x, l.in_norm.data_ptr<float>(), w.h.data(), T);
      matmul_share<ISA>(s, w, w.h.data(), hidden_, l.qkv, l.t_qkv, qn, qkv, qn,
                        l.qkv_bias.defined() ? l.qkv_bias.data_ptr<float>() : nullptr, false, tid, nt, l.p_qkv,
                        barrier);
      barrier.wait();
      const auto [r0, r1] = share(T * KVH_, tid, nt);
      for (int64_t task = r0; task < r1; ++task) rope_store(s, qkv, li, task / KVH_, task % KVH_);
      barrier.wait();
      if (T * KVH_ >= 4 * nt) {      // enough (token, KV group) tasks to share the threads evenly
        const auto [a0, a1] = share(T * KVH_, tid, nt);
        for (int64_t task = a0; task < a1; ++task) {
          const int64_t t = task / KVH_, g = task % KVH_;
          attend<ISA>(s, w, qkv, attn, li, t, g, g * (H_ / KVH_), (g + 1) * (H_ / KVH_));
        }
      } else {                       // few: one task per query head (9 heads over 2 threads, not 3 groups)
        const auto [a0, a1] = share(T * H_, tid, nt);
        for (int64_t task = a0; task < a1; ++task) {
          const int64_t t = task / H_, h = task % H_;
          attend<ISA>(s, w, qkv, attn, li, t, h / (H_ / KVH_), h, h + 1);
        }
      }
      barrier.wait();
      matmul_share<ISA>(s, w, attn, hd, l.o, l.t_o, hidden_, s.x, hidden_, nullptr, true, tid, nt, l.p_o, barrier);
      barrier.wait();
      rmsnorm(s.x, l.post_norm.data_ptr<float>(), w.h.data(), T);
      matmul_share<ISA>(s, w, w.h.data(), hidden_, l.gate_up, l.t_gate_up, 2 * inter_, gu, 2 * inter_, nullptr,
                        false, tid, nt, l.p_gate_up, barrier);
      barrier.wait();
      // SiLU(gate) * up: shared out over the threads for steps big enough to pay a barrier,
      // computed by each thread for itself below that.
      float* act = w.act.data();
      if (T >= SILU_SHARE_TOKENS) {
        const auto [t0, t1] = share(T, tid, nt);
        silu_rows<ISA>(gu, s.act, t0, t1);
        barrier.wait();
        act = s.act;
      } else {
        silu_rows<ISA>(gu, act, 0, T);
      }
      matmul_share<ISA>(s, w, act, inter_, l.down, l.t_down, hidden_, s.x, hidden_, nullptr, true, tid, nt, l.p_down,
                        barrier);
      barrier.wait();
    }
  }

#ifdef LLMOS_X86
  __attribute__((target("avx2,fma,f16c"), flatten))
  void run_avx2(const Step& s, Scratch& w, float* qkv, float* attn, float* gu, int tid, int nt,
                SpinBarrier& barrier) const {
    run<1>(s, w, qkv, attn, gu, tid, nt, barrier);
  }

  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c"), flatten))
  void run_vnni(const Step& s, Scratch& w, float* qkv, float* attn, float* gu, int tid, int nt,
                SpinBarrier& barrier) const {
    run<2>(s, w, qkv, attn, gu, tid, nt, barrier);
  }
#endif

  int64_t hidden_, inter_, H_, KVH_, D_;
  float eps_;
  std::vector<Layer> layers_;
  std::vector<torch::Tensor> k_, v_;
};

std::vector<std::string> cpu_features() {
  std::vector<std::string> f;
#ifdef LLMOS_X86
  if (__builtin_cpu_supports("avx2")) f.push_back("avx2");
  if (__builtin_cpu_supports("fma")) f.push_back("fma");
  if (__builtin_cpu_supports("f16c")) f.push_back("f16c");
  if (__builtin_cpu_supports("avx512f")) f.push_back("avx512f");
  if (__builtin_cpu_supports("avx512vnni")) f.push_back("avx512vnni");
  if (__builtin_cpu_supports("avx512bw")) f.push_back("avx512bw");
#endif
#if defined(__ARM_NEON)
  f.push_back("neon");
#endif
  return f;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matmul", &matmul, "x [M, K] @ packed w [N, K]^T");
  m.def("dequantize", &dequantize, "packed rows -> float32", py::arg("w"), py::arg("qtype"), py::arg("n"),
        py::arg("k"), py::arg("out") = py::none(), py::arg("isa") = -1);
  m.def("quantize", &quantize, "float32 rows -> packed");
  m.def("has_avx2", &has_avx2);
  m.def("has_avx512vnni", &has_vnni512);
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("set_panels", &DecodeStack::set_panels)
      .def("forward", &DecodeStack::forward, py::call_guard<py::gil_scoped_release>());
  m.def("gemm", &gemm, "x [M, K] @ packed w [N, K]^T through dequantized tiles and the BLAS GEMM");
  m.def("repack_panels", &repack_panels, "packed Q4_0/Q4_1/Q8_0 rows -> 16-row VNNI panels (int8 activations)");
  m.def("matmul_panels", &matmul_panels, "x [M, K] @ a panel-packed w [N, K]^T, int8 activations");
  m.def("has_blas", [] { return sgemm_ != nullptr; });
  m.def("cpu_features", &cpu_features);
}
