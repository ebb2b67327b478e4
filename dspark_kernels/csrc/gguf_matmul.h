// y[m, col0 + n] = sum_k x[m, k] * W[n, k] for float32 activations x and a weight W kept in a GGUF
// block format (one row of blocks per output row). Each weight chunk is dequantised once into a
// small float buffer (L1) and then used for every activation row, so the weight is streamed from
// memory once per call. Every output element is one dot product whose summation order does not
// depend on the number of rows, so a row's result is the same at any batch size.
#pragma once
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "simd.h"

namespace dspark {

// ggml type ids (ggml.h) of the formats handled here
enum GgmlType : int { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14 };

struct Format {
  int block_elems;  // weights per block
  int block_bytes;
};

inline Format format_of(int type) {
  switch (type) {
    case kQ4_0: return {32, 18};
    case kQ4_1: return {32, 20};
    case kQ8_0: return {32, 34};
    case kQ4_K: return {256, 144};
    case kQ6_K: return {256, 210};
    default: TORCH_CHECK(false, "unsupported ggml type ", type);
  }
  return {0, 0};
}

// 16 (AVX-512) / 8 (AVX2) unsigned bytes or signed bytes -> floats
#if defined(__AVX512F__)
inline void u8x16_to_f32(__m128i q, float scale, float offset, float* out) {
  const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q));
  _mm512_storeu_ps(out, _mm512_fmadd_ps(v, _mm512_set1_ps(scale), _mm512_set1_ps(offset)));
}
#elif defined(__AVX2__) && defined(__FMA__)
inline void u8x16_to_f32(__m128i q, float scale, float offset, float* out) {
  const __m256 sc = _mm256_set1_ps(scale), off = _mm256_set1_ps(offset);
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)));
  _mm256_storeu_ps(out, _mm256_fmadd_ps(lo, sc, off));
  _mm256_storeu_ps(out + 8, _mm256_fmadd_ps(hi, sc, off));
}
#endif

// Each dequantiser writes one block's weights, in order, to out.
// Q4_0: w = (q - 8) * d computed as q * d + (-8 * d); Q4_1: w = q * d + m.
inline void dequant_q4_x(const uint8_t* qs, float d, float offset, float* out) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  u8x16_to_f32(_mm_and_si128(q, mask), d, offset, out);
  u8x16_to_f32(_mm_and_si128(_mm_srli_epi16(q, 4), mask), d, offset, out + 16);
#else
  for (int i = 0; i < 16; ++i) {
    out[i] = std::fma(static_cast<float>(qs[i] & 0x0F), d, offset);
    out[i + 16] = std::fma(static_cast<float>(qs[i] >> 4), d, offset);
  }
#endif
}

inline void dequant_q4_0(const uint8_t* b, float* out) {
  const float d = fp16_to_fp32(read_u16(b));
  dequant_q4_x(b + 2, d, -8.f * d, out);
}

inline void dequant_q4_1(const uint8_t* b, float* out) {
  dequant_q4_x(b + 4, fp16_to_fp32(read_u16(b)), fp16_to_fp32(read_u16(b + 2)), out);
}

inline void dequant_q8_0(const uint8_t* b, float* out) {
  const float d = fp16_to_fp32(read_u16(b));
  const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
#if defined(__AVX512F__)
  const __m512 dv = _mm512_set1_ps(d);
  for (int i = 0; i < 32; i += 16) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + i));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), dv));
  }
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 dv = _mm256_set1_ps(d);
  for (int i = 0; i < 32; i += 8) {
    const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + i));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), dv));
  }
#else
  for (int i = 0; i < 32; ++i) out[i] = static_cast<float>(qs[i]) * d;
#endif
}

inline void dequant_q4_k(const uint8_t* b, float* out) {
  const float d = fp16_to_fp32(read_u16(b)), dmin = fp16_to_fp32(read_u16(b + 2));
  const uint8_t* sc = b + 4;  // 12 bytes: 8 six-bit scales and 8 six-bit mins
  const uint8_t* qs = b + 16;
  float dl[8], ml[8];
  for (int j = 0; j < 8; ++j) {
    const int s = j < 4 ? (sc[j] & 63) : ((sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4));
    const int mn = j < 4 ? (sc[j + 4] & 63) : ((sc[j + 4] >> 4) | ((sc[j] >> 6) << 4));
    dl[j] = d * static_cast<float>(s);
    ml[j] = dmin * static_cast<float>(mn);
  }
  for (int c = 0; c < 4; ++c) {  // 64 weights: low nibbles of 32 bytes, then their high nibbles
    const uint8_t* q = qs + c * 32;
    float* o = out + c * 64;
    const float d0 = dl[2 * c], m0 = ml[2 * c], d1 = dl[2 * c + 1], m1 = ml[2 * c + 1];
    for (int i = 0; i < 32; ++i) o[i] = d0 * static_cast<float>(q[i] & 0x0F) - m0;
    for (int i = 0; i < 32; ++i) o[32 + i] = d1 * static_cast<float>(q[i] >> 4) - m1;
  }
}

inline void dequant_q6_k(const uint8_t* b, float* out) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = fp16_to_fp32(read_u16(b + 208));
  for (int half = 0; half < 2; ++half) {
    const uint8_t* l = ql + half * 64;
    const uint8_t* h = qh + half * 32;
    float* o = out + half * 128;
    const int8_t* s = sc + half * 8;
    for (int part = 0; part < 4; ++part) {  // elements part*32 .. part*32+31
      const uint8_t* lq = l + (part % 2) * 32;
      const int lshift = (part / 2) * 4, hshift = part * 2;
      const float d0 = d * static_cast<float>(s[part * 2]);
      const float d1 = d * static_cast<float>(s[part * 2 + 1]);
      for (int i = 0; i < 32; ++i) {
        const int q = (((lq[i] >> lshift) & 0x0F) | (((h[i] >> hshift) & 3) << 4)) - 32;
        o[part * 32 + i] = (i < 16 ? d0 : d1) * static_cast<float>(q);
      }
    }
  }
}

inline void dequant_block(int type, const uint8_t* b, float* out) {
  switch (type) {
    case kQ4_0: dequant_q4_0(b, out); break;
    case kQ4_1: dequant_q4_1(b, out); break;
    case kQ8_0: dequant_q8_0(b, out); break;
    case kQ4_K: dequant_q4_k(b, out); break;
    case kQ6_K: dequant_q6_k(b, out); break;
    default: break;
  }
}

constexpr int kChunk = 256;  // weights dequantised per step (one K-quant block, 8 small blocks)
constexpr int kMaxRows = 64;

template <int kType>
inline void dequant_chunk(const uint8_t* row, int64_t k0, int len, float* buf) {
  constexpr int kBlockElems = kType == kQ4_K || kType == kQ6_K ? 256 : 32;
  constexpr int kBlockBytes = kType == kQ4_0 ? 18 : kType == kQ4_1 ? 20 : kType == kQ8_0 ? 34
                              : kType == kQ4_K ? 144 : 210;
  const uint8_t* blk = row + (k0 / kBlockElems) * kBlockBytes;
  for (int i = 0; i < len; i += kBlockElems, blk += kBlockBytes) {
    if constexpr (kType == kQ4_0) dequant_q4_0(blk, buf + i);
    else if constexpr (kType == kQ4_1) dequant_q4_1(blk, buf + i);
    else if constexpr (kType == kQ8_0) dequant_q8_0(blk, buf + i);
    else if constexpr (kType == kQ4_K) dequant_q4_k(blk, buf + i);
    else dequant_q6_k(blk, buf + i);
  }
}

// kRows output rows at a time: each activation vector loaded once feeds kRows accumulators.
// For one output element the accumulation order is the same for any kRows and any M.
template <int kType, int kRows>
inline void matmul_tile(const uint8_t* w, int64_t row_bytes, int64_t K, const float* x, int64_t M,
                        float* y, int64_t ldy, int64_t n0) {
  alignas(64) float buf[kRows][kChunk];
  VecF acc[kMaxRows][kRows];
  for (int64_t mi = 0; mi < M; ++mi)
    for (int r = 0; r < kRows; ++r) acc[mi][r] = VecF();
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int len = static_cast<int>(std::min<int64_t>(kChunk, K - k0));
    for (int r = 0; r < kRows; ++r) dequant_chunk<kType>(w + (n0 + r) * row_bytes, k0, len, buf[r]);
    for (int64_t mi = 0; mi < M; ++mi) {
      const float* xr = x + mi * K + k0;
      VecF a[kRows];
      for (int r = 0; r < kRows; ++r) a[r] = acc[mi][r];
      for (int i = 0; i < len; i += VecF::kWidth) {
        const VecF xv = VecF::load(xr + i);
        for (int r = 0; r < kRows; ++r) a[r] = fma(VecF::load(buf[r] + i), xv, a[r]);
      }
      for (int r = 0; r < kRows; ++r) acc[mi][r] = a[r];
    }
  }
  for (int64_t mi = 0; mi < M; ++mi)
    for (int r = 0; r < kRows; ++r) y[mi * ldy + n0 + r] = acc[mi][r].sum();
}

template <int kType>
inline void matmul_rows(const uint8_t* w, int64_t row_bytes, int64_t K, const float* x, int64_t M,
                        float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) matmul_tile<kType, 4>(w, row_bytes, K, x, M, y, ldy, n);
  for (; n < n_end; ++n) matmul_tile<kType, 1>(w, row_bytes, K, x, M, y, ldy, n);
}

/// x [M, K] float32 contiguous (M <= 64); w [N, row_bytes] uint8 GGUF rows of ``type``;
/// out [M, ldy] float32 contiguous: columns col0 .. col0 + N are overwritten.
inline void gguf_matmul(const at::Tensor& x, const at::Tensor& w, int64_t type, at::Tensor& out,
                        int64_t col0) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2, "w must be uint8 [N, row_bytes]");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && out.is_contiguous(), "contiguous only");
  const Format f = format_of(static_cast<int>(type));
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), row_bytes = w.size(1);
  TORCH_CHECK(M <= kMaxRows, "gguf_matmul takes at most ", kMaxRows, " rows");
  TORCH_CHECK(K % f.block_elems == 0 && row_bytes == K / f.block_elems * f.block_bytes,
              "weight row bytes do not match K");
  TORCH_CHECK(K % VecF::kWidth == 0, "K must be a multiple of the vector width");
  TORCH_CHECK(out.size(0) == M && col0 >= 0 && col0 + N <= out.size(1), "bad output shape");
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* xp = x.data_ptr<float>();
  float* yp = out.data_ptr<float>() + col0;
  const int64_t ldy = out.size(1);
  // about 64 KiB of weight per task keeps scheduling overhead small
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
    switch (type) {
      case kQ4_0: matmul_rows<kQ4_0>(wp, row_bytes, K, xp, M, yp, ldy, b, e); break;
      case kQ4_1: matmul_rows<kQ4_1>(wp, row_bytes, K, xp, M, yp, ldy, b, e); break;
      case kQ8_0: matmul_rows<kQ8_0>(wp, row_bytes, K, xp, M, yp, ldy, b, e); break;
      case kQ4_K: matmul_rows<kQ4_K>(wp, row_bytes, K, xp, M, yp, ldy, b, e); break;
      case kQ6_K: matmul_rows<kQ6_K>(wp, row_bytes, K, xp, M, yp, ldy, b, e); break;
      default: break;
    }
  });
}

/// Dequantise a whole weight [N, row_bytes] of ``type`` into float32 [N, K] (tests, lazy copies).
inline at::Tensor gguf_dequantize(const at::Tensor& w, int64_t type, int64_t K) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(), "bad w");
  const Format f = format_of(static_cast<int>(type));
  TORCH_CHECK(K % f.block_elems == 0 && w.size(1) == K / f.block_elems * f.block_bytes,
              "weight row bytes do not match K");
  at::Tensor out = at::empty({w.size(0), K}, at::kFloat);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t nb = K / f.block_elems, rb = w.size(1);
  at::parallel_for(0, w.size(0), 16, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n)
      for (int64_t j = 0; j < nb; ++j)
        dequant_block(static_cast<int>(type), wp + n * rb + j * f.block_bytes,
                      op + n * K + j * f.block_elems);
  });
  return out;
}

}  // namespace dspark
