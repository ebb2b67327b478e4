// y[m, col0 + n] = sum_k xq[m, k] * W[n, k] for Q4_0 / Q4_1 / Q8_0 weights, where xq is x
// quantised per row to Q8 blocks of 32 (d = amax / 127, q = round-half-even(x / d)), as
// llama.cpp does for these formats: the dot product of a weight block and an activation block is
// an exact integer sum (AVX512-VNNI dpbusd, or AVX2 maddubs + madd), scaled once per block in
// float32. Far fewer instructions per weight than dequantising to float, so the weight stream,
// not the arithmetic, bounds the speed. Each output element is accumulated over the blocks in a
// fixed order, so a row's result does not depend on how many rows are in the call.
#pragma once
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "gguf_matmul.h"
#include "simd.h"

namespace dspark {

constexpr int kQ8Block = 32;

// One activation row quantised: per 32-block int8 values, scale d and d * sum(q); d8 holds each
// block's d eight times (the lanes of that block's partial sums in the AVX-512 path).
struct Q8Row {
  std::vector<int8_t> q;
  std::vector<float> d, ds, d8;
};

inline void quantize_row_q8(const float* x, int64_t K, Q8Row& r) {
  const int64_t nb = K / kQ8Block;
  r.q.resize(K);
  r.d.resize(nb);
  r.ds.resize(nb);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQ8Block;
    float amax = 0.f;
    for (int i = 0; i < kQ8Block; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float d = amax / 127.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    int sum = 0;
    for (int i = 0; i < kQ8Block; ++i) {
      const int q = static_cast<int>(std::nearbyint(xb[i] * id));  // half-even (default mode)
      r.q[b * kQ8Block + i] = static_cast<int8_t>(q);
      sum += q;
    }
    r.d[b] = d;
    r.ds[b] = d * static_cast<float>(sum);
  }
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
  r.d8.resize(nb * 8);
  for (int64_t b = 0; b < nb; ++b) std::fill_n(r.d8.data() + b * 8, 8, r.d[b]);
#endif
}

#if defined(__AVX2__) && defined(__FMA__)
// 32 unsigned weight bytes (each <= 255 for VNNI, <= 127 for AVX2) . 32 signed activations
// -> 8 int32 partial sums
inline __m256i dot_u8s8(__m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
#endif
}

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// the 32 nibbles of a Q4 block in element order (low nibbles = elements 0..15, high = 16..31)
inline __m256i unpack_q4(const uint8_t* qs) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}
#endif

// one block's scalar terms against one activation block: the scaled integer dot, and (Q4_0,
// Q4_1) the offset term (Q4_1: m * d_x * sum(q_x); Q4_0: -8 * d_w * d_x * sum(q_x))
template <int kType>
inline void scalar_block_terms(const uint8_t* blk, const int8_t* xq, float dx, float dsx,
                               float& dot, float& offset) {
  const float dw = fp16_to_fp32(read_u16(blk));
  int isum = 0;
  offset = 0.f;
  if constexpr (kType == kQ8_0) {
    const int8_t* wq = reinterpret_cast<const int8_t*>(blk + 2);
    for (int i = 0; i < kQ8Block; ++i) isum += wq[i] * xq[i];
  } else {
    const uint8_t* qs = blk + (kType == kQ4_1 ? 4 : 2);
    for (int i = 0; i < 16; ++i) isum += (qs[i] & 0x0F) * xq[i] + (qs[i] >> 4) * xq[i + 16];
    offset = (kType == kQ4_1 ? fp16_to_fp32(read_u16(blk + 2)) : -8.f * dw) * dsx;
  }
  dot = static_cast<float>(isum) * (dw * dx);
}

// one output row n against M quantised activation rows
template <int kType>
inline void q8_dot_row(const uint8_t* wrow, int64_t nb, const std::vector<Q8Row>& xs, float* y,
                       int64_t ldy) {
  constexpr int kBytes = kType == kQ4_0 ? 18 : kType == kQ4_1 ? 20 : 34;
  const int64_t M = static_cast<int64_t>(xs.size());
#if defined(__AVX2__) && defined(__FMA__)
  // (AVX512-VNNI builds use the register tiles below, not this)
  __m256 acc[kMaxRows];
  float extra[kMaxRows];  // Q4_1: sum of m * d_x * sum(q_x); Q4_0: -8 * d_w * d_x * sum(q_x)
  for (int64_t m = 0; m < M; ++m) {
    acc[m] = _mm256_setzero_ps();
    extra[m] = 0.f;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wrow + b * kBytes;
    const float dw = fp16_to_fp32(read_u16(blk));
    if constexpr (kType == kQ8_0) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
      const __m256i wa = _mm256_sign_epi8(w, w);  // |w| (Q8_0 values are in [-127, 127])
      for (int64_t m = 0; m < M; ++m) {
        const __m256i x = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(xs[m].q.data() + b * kQ8Block));
        const __m256i dot = dot_u8s8(wa, _mm256_sign_epi8(x, w));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * xs[m].d[b]),
                                 acc[m]);
      }
    } else {
      const __m256i w = unpack_q4(blk + (kType == kQ4_1 ? 4 : 2));
      const float mw = kType == kQ4_1 ? fp16_to_fp32(read_u16(blk + 2)) : -8.f * dw;
      for (int64_t m = 0; m < M; ++m) {
        const __m256i x = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(xs[m].q.data() + b * kQ8Block));
        const __m256i dot = dot_u8s8(w, x);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * xs[m].d[b]),
                                 acc[m]);
        extra[m] += mw * xs[m].ds[b];
      }
    }
  }
  for (int64_t m = 0; m < M; ++m) y[m * ldy] = hsum256(acc[m]) + extra[m];
#else
  for (int64_t m = 0; m < M; ++m) {
    float acc = 0.f, extra = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      float dot, offset;
      scalar_block_terms<kType>(wrow + b * kBytes, xs[m].q.data() + b * kQ8Block, xs[m].d[b],
                                xs[m].ds[b], dot, offset);
      extra += offset;  // Q8_0: 0
      acc += dot;
    }
    y[m * ldy] = acc + extra;
  }
#endif
}

#if defined(__AVX512VNNI__) && defined(__AVX512F__) && defined(__AVX512DQ__)
constexpr int kTileN = 4;  // weight rows per tile
constexpr int kTileM = 4;  // activation rows per tile

// the offset term's per-block weight factor: Q8_0 -128 * d_w (signed weights are fed to dpbusd
// as w + 128), Q4_0 -8 * d_w, Q4_1 the block minimum m
template <int kType>
inline float offset_factor(const uint8_t* blk) {
  if constexpr (kType == kQ4_1) return fp16_to_fp32(read_u16(blk + 2));
  return (kType == kQ8_0 ? -128.f : -8.f) * fp16_to_fp32(read_u16(blk));
}

// sum_b a[b] * c[b] over n floats: 16 lanes, then the lanes' sum (fixed order for any caller)
inline float dot_blocks(const float* a, const float* c, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 16 <= n; b += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + b), _mm512_loadu_ps(c + b), acc);
  if (b < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - b)) - 1u);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + b), _mm512_maskz_loadu_ps(k, c + b), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// NR weight rows (w0, w0 + row_bytes, ...) x MC activation rows: register tile of NR * MC
// accumulators; per pair of blocks each weight register is unpacked once for all MC rows and
// each activation register loaded once for all NR rows. y[c * ldy + r] for the tile.
// Per output element: integer block dots scaled and summed lane-wise over the block pairs in
// order, the lanes' sum, plus the offset term dot_blocks(factors, d_x * sum(q_x)), plus an odd
// last block's scalar terms: the same arithmetic whatever the tile shape, so a row's result
// does not depend on how many rows are in the call.
template <int kType, int NR, int MC>
inline void q8_tile(const uint8_t* w0, int64_t row_bytes, int64_t nb, const Q8Row* xs,
                    float* y, int64_t ldy, float* fac) {
  constexpr int kBytes = kType == kQ4_0 ? 18 : kType == kQ4_1 ? 20 : 34;
  __m512 acc[NR][MC];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < MC; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    __m512i w[NR];
    __m512 dw[NR];
    for (int r = 0; r < NR; ++r) {
      const uint8_t* b0 = w0 + r * row_bytes + b * kBytes;
      const uint8_t* b1 = b0 + kBytes;
      dw[r] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(fp16_to_fp32(read_u16(b0)))),
                                 _mm256_set1_ps(fp16_to_fp32(read_u16(b1))), 1);
      if constexpr (kType == kQ8_0) {
        const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + 2));
        const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1 + 2));
        w[r] = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1),
                                _mm512_set1_epi8(static_cast<char>(0x80)));
      } else {
        constexpr int off = kType == kQ4_1 ? 4 : 2;
        w[r] = _mm512_inserti64x4(_mm512_castsi256_si512(unpack_q4(b0 + off)),
                                  unpack_q4(b1 + off), 1);
      }
    }
    for (int c = 0; c < MC; ++c) {
      const __m512i x = _mm512_loadu_si512(xs[c].q.data() + b * kQ8Block);
      const __m512 d8 = _mm512_loadu_ps(xs[c].d8.data() + b * 8);
      for (int r = 0; r < NR; ++r) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[r], x);
        acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw[r], d8), acc[r][c]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    const uint8_t* wr = w0 + r * row_bytes;
    for (int64_t i = 0; i < nb; ++i) fac[i] = offset_factor<kType>(wr + i * kBytes);
    // an odd last Q8_0 block is dotted signed by scalar_block_terms: no +128 to undo
    if (kType == kQ8_0 && b < nb) fac[b] = 0.f;
    for (int c = 0; c < MC; ++c) {
      float v = _mm512_reduce_add_ps(acc[r][c]) + dot_blocks(fac, xs[c].ds.data(), nb);
      if (b < nb) {  // an odd last block: its scaled integer dot (its offset is in dot_blocks)
        float dot, offset;
        scalar_block_terms<kType>(wr + b * kBytes, xs[c].q.data() + b * kQ8Block, xs[c].d[b],
                                  xs[c].ds[b], dot, offset);
        v += dot;
      }
      y[c * ldy + r] = v;
    }
  }
}

template <int kType, int NR>
inline void q8_tile_rows(const uint8_t* w0, int64_t row_bytes, int64_t nb,
                         const std::vector<Q8Row>& xs, float* y, int64_t ldy, float* fac) {
  const int64_t M = static_cast<int64_t>(xs.size());
  int64_t m = 0;
  for (; m + kTileM <= M; m += kTileM)
    q8_tile<kType, NR, kTileM>(w0, row_bytes, nb, xs.data() + m, y + m * ldy, ldy, fac);
  switch (M - m) {
    case 3: q8_tile<kType, NR, 3>(w0, row_bytes, nb, xs.data() + m, y + m * ldy, ldy, fac); break;
    case 2: q8_tile<kType, NR, 2>(w0, row_bytes, nb, xs.data() + m, y + m * ldy, ldy, fac); break;
    case 1: q8_tile<kType, NR, 1>(w0, row_bytes, nb, xs.data() + m, y + m * ldy, ldy, fac); break;
    default: break;
  }
}

// output rows [n0, n1) of one weight matrix against all activation rows
template <int kType>
inline void q8_rows_tiled(const uint8_t* wp, int64_t row_bytes, int64_t nb, int64_t n0,
                          int64_t n1, const std::vector<Q8Row>& xs, float* yp, int64_t ldy) {
  std::vector<float> fac(nb);
  int64_t n = n0;
  for (; n + kTileN <= n1; n += kTileN)
    q8_tile_rows<kType, kTileN>(wp + n * row_bytes, row_bytes, nb, xs, yp + n, ldy, fac.data());
  for (; n < n1; ++n)
    q8_tile_rows<kType, 1>(wp + n * row_bytes, row_bytes, nb, xs, yp + n, ldy, fac.data());
}
#endif

inline bool q8_supported(int64_t type) {
  return type == kQ4_0 || type == kQ4_1 || type == kQ8_0;
}

/// x [M, K] float32 contiguous (M <= 64); w [N, row_bytes] uint8 GGUF rows of ``type`` (Q4_0,
/// Q4_1 or Q8_0); out [M, ldy] float32 contiguous: columns col0 .. col0 + N are overwritten.
inline void gguf_matmul_q8(const at::Tensor& x, const at::Tensor& w, int64_t type,
                           at::Tensor& out, int64_t col0) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2, "w must be uint8 [N, row_bytes]");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && out.is_contiguous(), "contiguous only");
  TORCH_CHECK(q8_supported(type), "gguf_matmul_q8 takes Q4_0, Q4_1 or Q8_0, not type ", type);
  const Format f = format_of(static_cast<int>(type));
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), row_bytes = w.size(1);
  TORCH_CHECK(M <= kMaxRows, "gguf_matmul_q8 takes at most ", kMaxRows, " rows");
  TORCH_CHECK(K % kQ8Block == 0 && row_bytes == K / f.block_elems * f.block_bytes,
              "weight row bytes do not match K");
  TORCH_CHECK(out.size(0) == M && col0 >= 0 && col0 + N <= out.size(1), "bad output shape");
  std::vector<Q8Row> xs(M);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) quantize_row_q8(xp + m * K, K, xs[m]);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = out.data_ptr<float>() + col0;
  const int64_t ldy = out.size(1), nb = K / kQ8Block;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(row_bytes, 1));
#if defined(__AVX512VNNI__) && defined(__AVX512F__) && defined(__AVX512DQ__)
  at::parallel_for(0, (N + kTileN - 1) / kTileN, std::max<int64_t>(1, grain / kTileN),
                   [&](int64_t b, int64_t e) {
    const int64_t n0 = b * kTileN, n1 = std::min(N, e * kTileN);
    switch (type) {
      case kQ4_0: q8_rows_tiled<kQ4_0>(wp, row_bytes, nb, n0, n1, xs, yp, ldy); break;
      case kQ4_1: q8_rows_tiled<kQ4_1>(wp, row_bytes, nb, n0, n1, xs, yp, ldy); break;
      default: q8_rows_tiled<kQ8_0>(wp, row_bytes, nb, n0, n1, xs, yp, ldy); break;
    }
  });
#else
  at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const uint8_t* wr = wp + n * row_bytes;
      switch (type) {
        case kQ4_0: q8_dot_row<kQ4_0>(wr, nb, xs, yp + n, ldy); break;
        case kQ4_1: q8_dot_row<kQ4_1>(wr, nb, xs, yp + n, ldy); break;
        default: q8_dot_row<kQ8_0>(wr, nb, xs, yp + n, ldy); break;
      }
    }
  });
#endif
}

}  // namespace dspark
