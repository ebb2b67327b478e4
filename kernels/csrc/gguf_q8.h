// y[m, col0 + n] = sum_k xq[m, k] * W[n, k] for Q4_0 / Q4_1 / Q8_0 weights, where xq is x
// quantised per row to Q8 blocks of 32 (d = amax / 127, q = round-half-even(x / d)), as
// llama.cpp does for these formats: the dot product of a weight block and an activation block is
// an exact integer sum (AVX512-VNNI dpbusd, or AVX2 maddubs + madd), scaled once per block in
// float32. Far fewer instructions per weight than dequantising to float, so the weight stream,
// not the arithmetic, bounds the speed. Each output element is accumulated over the blocks in a
// fixed order, so a row's result does not depend on how many rows are in the call.
//
// The kernel reads the weights in a repacked layout (gguf_repack_q8, done once at load; same
// bytes per row as the GGUF row) that turns the per-block field shuffling of the file layout
// into whole-register loads while keeping each row one sequential stream. Per pair of blocks
// (b, b + 1): [d_b, d_b+1 (float16)][Q4_1: m_b, m_b+1][quants], quants = Q8_0 the 64 signed
// bytes of both blocks in order; Q4_0 / Q4_1 32 bytes, byte j = q_b[j] | q_b+1[j] << 4 (element
// j of each block), so the low nibbles of one 256-bit load are block b and the high nibbles
// block b + 1, each in element order. An odd last block stays in the file's layout.
#pragma once
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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

// ------------------------------------------------------------------------ repacked layout

template <int kType>
constexpr int kFileBlockBytes = kType == kQ4_0 ? 18 : kType == kQ4_1 ? 20 : 34;

// bytes of one pair of blocks in the repacked layout, and of its header (scales, minimums)
template <int kType>
constexpr int kPairBytes = 2 * kFileBlockBytes<kType>;
template <int kType>
constexpr int kPairHeader = kType == kQ4_1 ? 8 : 4;

// block b is in a pair (not an odd last block)
inline bool in_pair(int64_t nb, int64_t b) { return b < (nb & ~int64_t(1)); }

// the odd last block (file layout) of a repacked row
template <int kType>
inline const uint8_t* odd_block(const uint8_t* row, int64_t nb) {
  return row + (nb / 2) * kPairBytes<kType>;
}

template <int kType>
inline float block_scale(const uint8_t* row, int64_t nb, int64_t b) {
  if (!in_pair(nb, b)) return fp16_to_fp32(read_u16(odd_block<kType>(row, nb)));
  return fp16_to_fp32(read_u16(row + (b / 2) * kPairBytes<kType> + 2 * (b & 1)));
}

// Q4_1: the block minimum m
inline float block_min_q4_1(const uint8_t* row, int64_t nb, int64_t b) {
  if (!in_pair(nb, b)) return fp16_to_fp32(read_u16(odd_block<kQ4_1>(row, nb) + 2));
  return fp16_to_fp32(read_u16(row + (b / 2) * kPairBytes<kQ4_1> + 4 + 2 * (b & 1)));
}

// block b's 32 weight values (Q4: 0..15 unsigned, Q8_0: signed) from a repacked row
template <int kType>
inline void unpack_block(const uint8_t* row, int64_t nb, int64_t b, int* v) {
  if (!in_pair(nb, b)) {  // odd last block: the file's packing
    const uint8_t* blk = odd_block<kType>(row, nb);
    if constexpr (kType == kQ8_0) {
      for (int j = 0; j < 32; ++j) v[j] = reinterpret_cast<const int8_t*>(blk + 2)[j];
    } else {
      const uint8_t* q = blk + (kType == kQ4_1 ? 4 : 2);
      for (int j = 0; j < 16; ++j) {
        v[j] = q[j] & 0x0F;
        v[j + 16] = q[j] >> 4;
      }
    }
    return;
  }
  const uint8_t* qs = row + (b / 2) * kPairBytes<kType> + kPairHeader<kType>;
  if constexpr (kType == kQ8_0) {
    const int8_t* q = reinterpret_cast<const int8_t*>(qs + (b & 1) * 32);
    for (int j = 0; j < 32; ++j) v[j] = q[j];
  } else {
    for (int j = 0; j < 32; ++j) v[j] = (b & 1) ? (qs[j] >> 4) : (qs[j] & 0x0F);
  }
}

template <int kType>
inline void repack_row(const uint8_t* src, int64_t nb, uint8_t* dst) {
  constexpr int kBytes = kFileBlockBytes<kType>;
  constexpr int off = kType == kQ8_0 ? 2 : kType == kQ4_1 ? 4 : 2;  // quants in a file block
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    const uint8_t* b0 = src + b * kBytes;
    const uint8_t* b1 = b0 + kBytes;
    uint8_t* pp = dst + (b / 2) * kPairBytes<kType>;
    std::memcpy(pp, b0, 2);
    std::memcpy(pp + 2, b1, 2);
    if constexpr (kType == kQ4_1) {
      std::memcpy(pp + 4, b0 + 2, 2);
      std::memcpy(pp + 6, b1 + 2, 2);
    }
    uint8_t* qs = pp + kPairHeader<kType>;
    if constexpr (kType == kQ8_0) {
      std::memcpy(qs, b0 + off, 32);
      std::memcpy(qs + 32, b1 + off, 32);
    } else {
      const uint8_t* q0 = b0 + off;
      const uint8_t* q1 = b1 + off;
      for (int j = 0; j < 32; ++j) {
        const int v0 = j < 16 ? (q0[j] & 0x0F) : (q0[j - 16] >> 4);
        const int v1 = j < 16 ? (q1[j] & 0x0F) : (q1[j - 16] >> 4);
        qs[j] = static_cast<uint8_t>(v0 | (v1 << 4));
      }
    }
  }
  if (b < nb) std::memcpy(dst + (b / 2) * kPairBytes<kType>, src + b * kBytes, kBytes);
}

inline bool q8_supported(int64_t type) {
  return type == kQ4_0 || type == kQ4_1 || type == kQ8_0;
}

/// GGUF rows w [N, row_bytes] (Q4_0 / Q4_1 / Q8_0) -> the repacked layout gguf_matmul_q8 reads
/// (same shape)
inline at::Tensor gguf_repack_q8(const at::Tensor& w, int64_t type) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(),
              "w must be contiguous uint8 [N, row_bytes]");
  TORCH_CHECK(q8_supported(type), "gguf_repack_q8 takes Q4_0, Q4_1 or Q8_0, not type ", type);
  const Format f = format_of(static_cast<int>(type));
  const int64_t N = w.size(0), row_bytes = w.size(1);
  TORCH_CHECK(row_bytes % f.block_bytes == 0, "row bytes are not whole blocks");
  const int64_t nb = row_bytes / f.block_bytes;
  at::Tensor out = at::empty_like(w);
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, N, 64, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      switch (type) {
        case kQ4_0: repack_row<kQ4_0>(src + n * row_bytes, nb, dst + n * row_bytes); break;
        case kQ4_1: repack_row<kQ4_1>(src + n * row_bytes, nb, dst + n * row_bytes); break;
        default: repack_row<kQ8_0>(src + n * row_bytes, nb, dst + n * row_bytes); break;
      }
    }
  });
  return out;
}

// one block's scalar terms against one activation block: the scaled integer dot, and (Q4_0,
// Q4_1) the offset term (Q4_1: m * d_x * sum(q_x); Q4_0: -8 * d_w * d_x * sum(q_x))
template <int kType>
inline void scalar_block_terms(const uint8_t* row, int64_t nb, int64_t b, const int8_t* xq,
                               float dx, float dsx, float& dot, float& offset) {
  const float dw = block_scale<kType>(row, nb, b);
  int v[32];
  unpack_block<kType>(row, nb, b, v);
  int isum = 0;
  for (int i = 0; i < kQ8Block; ++i) isum += v[i] * xq[i];
  offset = 0.f;
  if constexpr (kType == kQ4_1) offset = block_min_q4_1(row, nb, b) * dsx;
  if constexpr (kType == kQ4_0) offset = -8.f * dw * dsx;
  dot = static_cast<float>(isum) * (dw * dx);
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

// the 32 nibbles of a file-layout Q4 block in element order (low nibbles = elements 0..15)
inline __m256i unpack_q4(const uint8_t* qs) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}

// block b's 32 weight bytes from a repacked row (Q4: unsigned values; Q8_0: signed)
template <int kType>
inline __m256i block_quants(const uint8_t* row, int64_t nb, int64_t b) {
  if (!in_pair(nb, b)) {
    const uint8_t* blk = odd_block<kType>(row, nb);
    if constexpr (kType == kQ8_0) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    return unpack_q4(blk + (kType == kQ4_1 ? 4 : 2));
  }
  const uint8_t* qs = row + (b / 2) * kPairBytes<kType> + kPairHeader<kType>;
  if constexpr (kType == kQ8_0) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + (b & 1) * 32));
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));
  const __m256i m = _mm256_set1_epi8(0x0F);
  return (b & 1) ? _mm256_and_si256(_mm256_srli_epi16(v, 4), m) : _mm256_and_si256(v, m);
}
#endif

// one output row n (repacked) against M quantised activation rows
template <int kType>
inline void q8_dot_row(const uint8_t* row, int64_t nb, const std::vector<Q8Row>& xs, float* y,
                       int64_t ldy) {
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
    const float dw = block_scale<kType>(row, nb, b);
    if constexpr (kType == kQ8_0) {
      const __m256i w = block_quants<kType>(row, nb, b);
      const __m256i wa = _mm256_sign_epi8(w, w);  // |w| (Q8_0 values are in [-127, 127])
      for (int64_t m = 0; m < M; ++m) {
        const __m256i x = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(xs[m].q.data() + b * kQ8Block));
        const __m256i dot = dot_u8s8(wa, _mm256_sign_epi8(x, w));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * xs[m].d[b]),
                                 acc[m]);
      }
    } else {
      const __m256i w = block_quants<kType>(row, nb, b);
      const float mw = kType == kQ4_1 ? block_min_q4_1(row, nb, b) : -8.f * dw;
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
      scalar_block_terms<kType>(row, nb, b, xs[m].q.data() + b * kQ8Block, xs[m].d[b],
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

// the offset term's per-block weight factor: Q8_0 -128 * d_w (signed weights are fed to dpbusd
// as w + 128; an odd last block 0: its dot is taken signed by scalar_block_terms), Q4_0
// -8 * d_w, Q4_1 the block minimum m
template <int kType>
inline void offset_factors(const uint8_t* row, int64_t nb, float* fac) {
  constexpr int kField = kType == kQ4_1 ? 4 : 0;  // m or d in the pair header
  const __m128 k = _mm_set1_ps(kType == kQ8_0 ? -128.f : -8.f);
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {  // both blocks' fields of a pair: 2 float16 -> 2 floats
    uint32_t f2;
    std::memcpy(&f2, row + (b / 2) * kPairBytes<kType> + kField, 4);
    __m128 v = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(f2)));
    if constexpr (kType != kQ4_1) v = _mm_mul_ps(v, k);
    _mm_storel_pi(reinterpret_cast<__m64*>(fac + b), v);
  }
  if (b < nb) {
    if constexpr (kType == kQ4_1) fac[b] = block_min_q4_1(row, nb, b);
    else if constexpr (kType == kQ4_0) fac[b] = -8.f * block_scale<kType>(row, nb, b);
    else fac[b] = 0.f;
  }
}

// NR weight rows (w0, w0 + row_bytes, ...) x MC activation rows: register tile of NR * MC
// accumulators; per pair of blocks each weight register is loaded once for all MC rows and
// each activation register once for all NR rows. y[c * ldy + r] for the tile.
// Per output element: integer block dots scaled and summed lane-wise over the block pairs in
// order, the lanes' sum, plus the offset term dot_blocks(factors, d_x * sum(q_x)), plus an odd
// last block's scalar terms: the same arithmetic whatever the tile shape, so a row's result
// does not depend on how many rows are in the call.
template <int kType, int NR, int MC>
inline void q8_tile(const uint8_t* w0, int64_t row_bytes, int64_t nb, const Q8Row* xs,
                    float* y, int64_t ldy, float* fac) {
  constexpr int kPB = kPairBytes<kType>, kHdr = kPairHeader<kType>;
  const __m512i pair_idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[NR][MC];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < MC; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    __m512i w[NR];
    __m512 dw[NR];
    for (int r = 0; r < NR; ++r) {
      const uint8_t* pp = w0 + r * row_bytes + (b / 2) * kPB;
      uint32_t d2;
      std::memcpy(&d2, pp, 4);
      // [d_b x 8, d_b+1 x 8]
      dw[r] = _mm512_permutexvar_ps(pair_idx, _mm512_castps128_ps512(
          _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(d2)))));
      if constexpr (kType == kQ8_0) {
        w[r] = _mm512_xor_si512(_mm512_loadu_si512(pp + kHdr),
                                _mm512_set1_epi8(static_cast<char>(0x80)));
      } else {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pp + kHdr));
        const __m256i m = _mm256_set1_epi8(0x0F);
        w[r] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m)),
                                  _mm256_and_si256(_mm256_srli_epi16(v, 4), m), 1);
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
    offset_factors<kType>(wr, nb, fac);
    for (int c = 0; c < MC; ++c) {
      float v = _mm512_reduce_add_ps(acc[r][c]) + dot_blocks(fac, xs[c].ds.data(), nb);
      if (b < nb) {  // an odd last block: its scaled integer dot (its offset is in dot_blocks)
        float dot, offset;
        scalar_block_terms<kType>(wr, nb, b, xs[c].q.data() + b * kQ8Block, xs[c].d[b],
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

/// x [M, K] float32 contiguous (M <= 64); w [N, row_bytes] uint8 rows of ``type`` (Q4_0, Q4_1
/// or Q8_0) in the repacked layout of gguf_repack_q8; out [M, ldy] float32 contiguous: columns
/// col0 .. col0 + N are overwritten.
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
