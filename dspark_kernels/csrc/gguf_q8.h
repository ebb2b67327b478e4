// y[m, col0 + n] = sum_k xq[m, k] * W[n, k] for Q4_0 / Q4_1 / Q8_0 weights, where xq is x
// quantised per row to Q8 blocks of 32 (d = amax / 127, q = round-half-even(x / d)), as
// llama.cpp does for these formats: the dot product of a weight block and an activation block is
// an exact integer sum (AVX512-VNNI dpbusd, or AVX2 maddubs + madd), scaled once per block in
// float32.
//
// The weights are read in a repacked layout (gguf_repack_q8, once at load) that interleaves 16
// output rows: the integer lanes of one register are 16 output rows, so a block's 8 integer
// steps (4 weights each) accumulate in those lanes and the float work (convert, scale, add) is
// done once per block of 32 weights for 16 rows at a time, not once per 4 weights of one row as
// with row-major blocks; each weight register serves every activation row of the call (the
// activation's 4 bytes are broadcast). Few-row products (verification of short drafts) are
// then about as cheap as one row.
//
// Layout: groups of 16 rows (the last one zero-padded; the tensor handed out is a view of the
// first N rows of the padded storage), each 16 * row_bytes bytes: per block b of 32 weights,
//   [d of rows 0..15 (float16)] [Q4_1: m of rows 0..15 (float16)] [quants]
// quants in chunks of 64 bytes, byte 4 * r + j of a chunk for row r:
//   Q8_0: 8 chunks, chunk t holds q[r][4t + j] (signed);
//   Q4_0 / Q4_1: 4 chunks, chunk t holds q[r][4t + j] | q[r][16 + 4t + j] << 4, which is
//   exactly byte 4t + j of the file's block (low nibbles are elements 0..15, high 16..31).
//
// Per output element: acc = fma(float(isum_b), d_w,b * d_x,b, acc) over the blocks in order
// (Q4_1: then acc = fma(m_b, d_x,b * sum(q_x,b), acc)); isum_b is exact, so a row's result
// does not depend on how many rows are in the call or which tile computed it.
#pragma once
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "gguf_matmul.h"
#include "simd.h"

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace dspark {

constexpr int kQ8Block = 32;
constexpr int kQ8Group = 16;  // output rows interleaved in the repacked layout

#if defined(__AVX512VNNI__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define DSPARK_Q8_VNNI 1
// activation rows per register tile: 4 measured 5-10 % faster per row than 8 (8-16 rows, all
// four shapes of the embedded model, /work/runs/s7/kb2.py); both are compute-bound at ~50 MACs
// per cycle and core
constexpr int kQ8Cols = 4;
constexpr int kQ8SignedBias = 128;  // Q8_0 weights enter dpbusd as unsigned w + 128
#elif defined(__AVX2__) && defined(__FMA__)
#define DSPARK_Q8_AVX2 1
constexpr int kQ8Cols = 4;
constexpr int kQ8SignedBias = 0;  // sign trick: |w| . sign(x, w)
#else
constexpr int kQ8Cols = 4;
constexpr int kQ8SignedBias = 0;
#endif

template <int kType>
constexpr int kFileBlockBytes = kType == kQ4_0 ? 18 : kType == kQ4_1 ? 20 : 34;
// bytes of one block of a 16-row group, and of its header (scales, minimums)
template <int kType>
constexpr int kGroupBlockBytes = kQ8Group * kFileBlockBytes<kType>;
template <int kType>
constexpr int kGroupHeader = kType == kQ4_1 ? 64 : 32;

inline bool q8_supported(int64_t type) {
  return type == kQ4_0 || type == kQ4_1 || type == kQ8_0;
}

// The activation rows of one call quantised: per row q [K] int8, and per block d, d * sum(q)
// and the integer term corr added to each weight block's integer dot (Q4_0: -8 * sum(q), the
// weights' offset; Q8_0 on VNNI: -128 * sum(q), undoing the +128 bias; otherwise 0).
struct Q8Act {
  int64_t M = 0, K = 0, nb = 0;
  std::vector<int8_t> q;
  std::vector<float> d, ds;
  std::vector<int32_t> corr;
  const int8_t* row(int64_t m) const { return q.data() + m * K; }
};

inline void quantize_act_q8(const float* x, int64_t M, int64_t K, int64_t type, Q8Act& a) {
  const int64_t nb = K / kQ8Block;
  a.M = M;
  a.K = K;
  a.nb = nb;
  a.q.resize(M * K);
  a.d.resize(M * nb);
  a.ds.resize(M * nb);
  a.corr.resize(M * nb);
  const int32_t off = type == kQ4_0 ? -8 : type == kQ8_0 ? -kQ8SignedBias : 0;
  for (int64_t i = 0; i < M * nb; ++i) {
    const float* xb = x + i * kQ8Block;  // rows are contiguous: block i of the flat [M, K]
    int8_t* qb = a.q.data() + i * kQ8Block;
    int sum = 0;
    float d;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    d = amax / 127.f;
    const __m512 id = _mm512_set1_ps(d != 0.f ? 1.f / d : 0.f);
    // x * (1 / d) rounded half-even (the default rounding mode), as the scalar code below
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, id));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, id));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtepi32_epi8(q1));
    sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#elif defined(__AVX2__)
    // the same arithmetic 8 lanes at a time (the scalar loop below: 5.6 -> 3.3 us for an
    // 8 x 576 call with a 16-row output, ~0.3 ms of an 8-row forward of the embedded model)
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 xv[4];
    __m256 mx = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      xv[j] = _mm256_loadu_ps(xb + 8 * j);
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, xv[j]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    d = _mm_cvtss_f32(m4) / 127.f;
    const __m256 id = _mm256_set1_ps(d != 0.f ? 1.f / d : 0.f);
    __m256i qv[4];
    for (int j = 0; j < 4; ++j) qv[j] = _mm256_cvtps_epi32(_mm256_mul_ps(xv[j], id));
    const __m256i s4 = _mm256_add_epi32(_mm256_add_epi32(qv[0], qv[1]),
                                        _mm256_add_epi32(qv[2], qv[3]));
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    sum = _mm_cvtsi128_si32(s);
    // int32 -> int8 (|q| <= 127: no saturation); the packs interleave 128-bit lanes, the
    // permutation restores element order
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(qv[0], qv[1]),
                                         _mm256_packs_epi32(qv[2], qv[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
    float amax = 0.f;
    for (int j = 0; j < kQ8Block; ++j) amax = std::max(amax, std::fabs(xb[j]));
    d = amax / 127.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    for (int j = 0; j < kQ8Block; ++j) {
      const int q = static_cast<int>(std::nearbyint(xb[j] * id));  // half-even (default mode)
      qb[j] = static_cast<int8_t>(q);
      sum += q;
    }
#endif
    a.d[i] = d;
    a.ds[i] = d * static_cast<float>(sum);
    a.corr[i] = off * sum;
  }
}

// ------------------------------------------------------------------------ repacked layout

template <int kType>
inline void repack_group(const uint8_t* src, int64_t rows, int64_t nb, int64_t row_bytes,
                         uint8_t* dst) {
  constexpr int kBytes = kFileBlockBytes<kType>, kHdr = kGroupHeader<kType>;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* s = src + r * row_bytes + b * kBytes;
      uint8_t* blk = dst + b * kGroupBlockBytes<kType>;
      std::memcpy(blk + 2 * r, s, 2);  // d
      if constexpr (kType == kQ4_1) std::memcpy(blk + 32 + 2 * r, s + 2, 2);  // m
      uint8_t* qs = blk + kHdr;
      if constexpr (kType == kQ8_0) {
        for (int t = 0; t < 8; ++t) std::memcpy(qs + 64 * t + 4 * r, s + 2 + 4 * t, 4);
      } else {
        const uint8_t* q = s + (kType == kQ4_1 ? 4 : 2);
        for (int t = 0; t < 4; ++t) std::memcpy(qs + 64 * t + 4 * r, q + 4 * t, 4);
      }
    }
  }
}

/// GGUF rows w [N, row_bytes] (Q4_0 / Q4_1 / Q8_0) -> the 16-row interleaved layout
/// gguf_matmul_q8 reads: a [N, row_bytes] view of storage padded to a multiple of 16 rows
inline at::Tensor gguf_repack_q8(const at::Tensor& w, int64_t type) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(),
              "w must be contiguous uint8 [N, row_bytes]");
  TORCH_CHECK(q8_supported(type), "gguf_repack_q8 takes Q4_0, Q4_1 or Q8_0, not type ", type);
  const Format f = format_of(static_cast<int>(type));
  const int64_t N = w.size(0), row_bytes = w.size(1);
  TORCH_CHECK(row_bytes % f.block_bytes == 0, "row bytes are not whole blocks");
  const int64_t nb = row_bytes / f.block_bytes, G = (N + kQ8Group - 1) / kQ8Group;
  at::Tensor out = at::zeros({G * kQ8Group, row_bytes}, w.options());
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t gbytes = kQ8Group * row_bytes;
  at::parallel_for(0, G, 4, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t rows = std::min<int64_t>(kQ8Group, N - g * kQ8Group);
      const uint8_t* s = src + g * gbytes;
      switch (type) {
        case kQ4_0: repack_group<kQ4_0>(s, rows, nb, row_bytes, dst + g * gbytes); break;
        case kQ4_1: repack_group<kQ4_1>(s, rows, nb, row_bytes, dst + g * gbytes); break;
        default: repack_group<kQ8_0>(s, rows, nb, row_bytes, dst + g * gbytes); break;
      }
    }
  });
  return out.narrow(0, 0, N);
}

// ------------------------------------------------------------------------------- kernels

#if defined(DSPARK_Q8_VNNI)
// Software prefetch of the weights kQ8PrefetchBytes ahead of the block being read: a decode
// step streams ~96 MB that do not stay in cache between steps (one pass over 4 copies of the
// embedded model's Q4_1 layers and Q8_0 head, 384 MB, 2 threads, session 12's Xeon: 1 row
// 18.6 -> 17.6 ms, 8 rows 31.6 -> 27.9 ms; 1 / 4 / 8 / 16 KiB ahead tried, 4-8 KiB best)
constexpr int kQ8PrefetchBytes = 8192;

template <int kBytes>
inline void q8_prefetch(const uint8_t* p) {
  for (int off = 0; off < kBytes; off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p + kQ8PrefetchBytes + off), _MM_HINT_T0);
}

// A block's scales for the 16 rows of a group: d (float16 -> float), and Q4_1's minimums m
template <int kType>
inline void q8_block_scales(const uint8_t* blk, __m512& dw, __m512& mw) {
  dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
  mw = kType == kQ4_1
           ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32)))
           : _mm512_setzero_ps();
}

// The per-block float work of one activation row i for 16 output rows, shared by the VNNI and
// AMX kernels so that their outputs are bitwise the same: acc + float(isum) * (d_w * d_x), then
// Q4_1's minimum term
template <int kType>
inline __m512 q8_block_acc(__m512i isum, __m512 dw, __m512 mw, const Q8Act& a, int64_t i,
                           __m512 acc) {
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, _mm512_set1_ps(a.d[i])), acc);
  if constexpr (kType == kQ4_1) acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(a.ds[i]), acc);
  return acc;
}

// One 16-row group (g: its first block) against activation rows c0 .. c0 + MC - 1:
// y[c * ldy + r] for r < rows.
template <int kType, int MC>
inline void q8_group(const uint8_t* g, const Q8Act& a, int64_t c0, float* y, int64_t ldy,
                     int rows) {
  constexpr int kGB = kGroupBlockBytes<kType>, kHdr = kGroupHeader<kType>;
  const int64_t nb = a.nb;
  __m512 acc[MC];
  for (int c = 0; c < MC; ++c) acc[c] = _mm512_setzero_ps();
  const __m512i nib = _mm512_set1_epi8(0x0F), bias = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = g + b * kGB;
    q8_prefetch<kGB>(blk);
    __m512 dw, mw;
    q8_block_scales<kType>(blk, dw, mw);
    const uint8_t* qs = blk + kHdr;
    __m512i ia[MC];
    const int8_t* xr[MC];
    for (int c = 0; c < MC; ++c) {
      ia[c] = _mm512_set1_epi32(a.corr[(c0 + c) * nb + b]);
      xr[c] = a.row(c0 + c) + b * kQ8Block;
    }
    if constexpr (kType == kQ8_0) {
      for (int t = 0; t < 8; ++t) {
        const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(qs + 64 * t), bias);
        for (int c = 0; c < MC; ++c) {
          int32_t x4;
          std::memcpy(&x4, xr[c] + 4 * t, 4);
          ia[c] = _mm512_dpbusd_epi32(ia[c], w, _mm512_set1_epi32(x4));
        }
      }
    } else {
      for (int t = 0; t < 4; ++t) {
        const __m512i v = _mm512_loadu_si512(qs + 64 * t);
        const __m512i lo = _mm512_and_si512(v, nib);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        for (int c = 0; c < MC; ++c) {
          int32_t xl, xh;
          std::memcpy(&xl, xr[c] + 4 * t, 4);
          std::memcpy(&xh, xr[c] + 16 + 4 * t, 4);
          ia[c] = _mm512_dpbusd_epi32(ia[c], lo, _mm512_set1_epi32(xl));
          ia[c] = _mm512_dpbusd_epi32(ia[c], hi, _mm512_set1_epi32(xh));
        }
      }
    }
    for (int c = 0; c < MC; ++c)
      acc[c] = q8_block_acc<kType>(ia[c], dw, mw, a, (c0 + c) * nb + b, acc[c]);
  }
  const __mmask16 k = rows >= kQ8Group ? static_cast<__mmask16>(0xFFFF)
                                       : static_cast<__mmask16>((1u << rows) - 1u);
  for (int c = 0; c < MC; ++c) _mm512_mask_storeu_ps(y + c * ldy, k, acc[c]);
}
#elif defined(DSPARK_Q8_AVX2)
// AVX2: both 8-row halves of the group in one pass over the blocks (each activation broadcast
// serves 16 output rows: 8 rows of 3072 x 576 Q4_1, one thread, 54 -> 66 GMAC/s streaming the
// weights from memory; 1 row 33 -> 37; software prefetch measured slower here); maddubs + madd
// make the 4-weight integer sums
template <int kType, int MC>
inline void q8_group(const uint8_t* g, const Q8Act& a, int64_t c0, float* y, int64_t ldy,
                     int rows) {
  constexpr int kGB = kGroupBlockBytes<kType>, kHdr = kGroupHeader<kType>;
  const int64_t nb = a.nb;
  const __m256i ones = _mm256_set1_epi16(1), nib = _mm256_set1_epi8(0x0F);
  __m256 acc[2][MC];
  for (int h = 0; h < 2; ++h)
    for (int c = 0; c < MC; ++c) acc[h][c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = g + b * kGB;
    const uint8_t* qs = blk + kHdr;
    __m256i ia[2][MC];
    const int8_t* xr[MC];
    for (int c = 0; c < MC; ++c) {
      ia[0][c] = ia[1][c] = _mm256_set1_epi32(a.corr[(c0 + c) * nb + b]);
      xr[c] = a.row(c0 + c) + b * kQ8Block;
    }
    if constexpr (kType == kQ8_0) {
      for (int t = 0; t < 8; ++t) {
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 64 * t));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 64 * t + 32));
        const __m256i aw0 = _mm256_sign_epi8(w0, w0), aw1 = _mm256_sign_epi8(w1, w1);  // |w|
        for (int c = 0; c < MC; ++c) {
          int32_t x4;
          std::memcpy(&x4, xr[c] + 4 * t, 4);
          const __m256i bx = _mm256_set1_epi32(x4);
          ia[0][c] = _mm256_add_epi32(
              ia[0][c], _mm256_madd_epi16(_mm256_maddubs_epi16(aw0, _mm256_sign_epi8(bx, w0)), ones));
          ia[1][c] = _mm256_add_epi32(
              ia[1][c], _mm256_madd_epi16(_mm256_maddubs_epi16(aw1, _mm256_sign_epi8(bx, w1)), ones));
        }
      }
    } else {
      for (int t = 0; t < 4; ++t) {
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 64 * t));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 64 * t + 32));
        const __m256i lo0 = _mm256_and_si256(v0, nib);
        const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), nib);
        const __m256i lo1 = _mm256_and_si256(v1, nib);
        const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), nib);
        for (int c = 0; c < MC; ++c) {
          int32_t xl, xh;
          std::memcpy(&xl, xr[c] + 4 * t, 4);
          std::memcpy(&xh, xr[c] + 16 + 4 * t, 4);
          const __m256i bl = _mm256_set1_epi32(xl), bh = _mm256_set1_epi32(xh);
          const __m256i s0 =
              _mm256_add_epi16(_mm256_maddubs_epi16(lo0, bl), _mm256_maddubs_epi16(hi0, bh));
          const __m256i s1 =
              _mm256_add_epi16(_mm256_maddubs_epi16(lo1, bl), _mm256_maddubs_epi16(hi1, bh));
          ia[0][c] = _mm256_add_epi32(ia[0][c], _mm256_madd_epi16(s0, ones));
          ia[1][c] = _mm256_add_epi32(ia[1][c], _mm256_madd_epi16(s1, ones));
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 dw = _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16 * h)));
      for (int c = 0; c < MC; ++c) {
        const int64_t i = (c0 + c) * nb + b;
        acc[h][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[h][c]),
                                    _mm256_mul_ps(dw, _mm256_set1_ps(a.d[i])), acc[h][c]);
        if constexpr (kType == kQ4_1) {
          const __m256 mw = _mm256_cvtph_ps(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 32 + 16 * h)));
          acc[h][c] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a.ds[i]), acc[h][c]);
        }
      }
    }
  }
  for (int h = 0; h < 2 && 8 * h < rows; ++h) {
    const int n = std::min(8, rows - 8 * h);
    for (int c = 0; c < MC; ++c) {
      if (n == 8) {
        _mm256_storeu_ps(y + c * ldy + 8 * h, acc[h][c]);
      } else {
        float tmp[8];
        _mm256_storeu_ps(tmp, acc[h][c]);
        std::memcpy(y + c * ldy + 8 * h, tmp, n * sizeof(float));
      }
    }
  }
}
#else
// portable: the same per-element arithmetic, one output at a time
template <int kType, int MC>
inline void q8_group(const uint8_t* g, const Q8Act& a, int64_t c0, float* y, int64_t ldy,
                     int rows) {
  constexpr int kGB = kGroupBlockBytes<kType>, kHdr = kGroupHeader<kType>;
  const int64_t nb = a.nb;
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < MC; ++c) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = g + b * kGB;
        const uint8_t* qs = blk + kHdr;
        const int8_t* x = a.row(c0 + c) + b * kQ8Block;
        const int64_t i = (c0 + c) * nb + b;
        int32_t isum = a.corr[i];
        for (int j = 0; j < kQ8Block; ++j) {
          int w;
          if constexpr (kType == kQ8_0) {
            w = reinterpret_cast<const int8_t*>(qs)[64 * (j / 4) + 4 * r + j % 4];
          } else {
            const int jj = j & 15;
            const uint8_t byte = qs[64 * (jj / 4) + 4 * r + jj % 4];
            w = j < 16 ? (byte & 0x0F) : (byte >> 4);
          }
          isum += w * x[j];
        }
        acc = std::fma(static_cast<float>(isum), fp16_to_fp32(read_u16(blk + 2 * r)) * a.d[i], acc);
        if constexpr (kType == kQ4_1) acc = std::fma(fp16_to_fp32(read_u16(blk + 32 + 2 * r)), a.ds[i], acc);
      }
      y[c * ldy + r] = acc;
    }
  }
}
#endif

#if defined(DSPARK_Q8_VNNI) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define DSPARK_Q8_AMX 1
// AMX (Intel Sapphire Rapids and later): the same per-block integer sums from the tile unit.
// A 16-row group's block of quants in the repacked layout is already an AMX B tile (8 rows of
// 64 bytes: row t holds, for output row r, weights 4t .. 4t + 3 at bytes 4r .. 4r + 3; the
// nibble formats are unpacked to bytes first), the activation block is an A tile (rows of 32
// bytes, stride K), and one TDPBSSD / TDPBSUD gives the exact 16 x 16 integer sums of a block for
// up to 16 activation rows. The float work per block is the VNNI kernel's, lane for lane
// (q8_block_acc, one definition for both), so every output is bitwise
// the VNNI kernel's and the two can be mixed by row count (tested).

// process-wide permission to use the tile data registers (Linux >= 5.16); false when refused
inline bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// rows from which gguf_matmul_q8 takes the tile unit (0 = never); DSPARK_AMX_MIN_ROWS sets it,
// DSPARK_AMX=0 turns it off
inline int& amx_min_rows_ref() {
  static int rows = [] {
    const char* off = std::getenv("DSPARK_AMX");
    if (off && (std::strcmp(off, "0") == 0 || std::strcmp(off, "off") == 0)) return 0;
    if (!amx_permitted()) return 0;
    const char* env = std::getenv("DSPARK_AMX_MIN_ROWS");
    return env ? std::max(0, std::atoi(env)) : 8;
  }();
  return rows;
}

// the tile unit for Q4_0 / Q4_1 too (off: slower there; the tests turn it on to check them)
inline bool& amx_all_formats_ref() {
  static bool all = false;
  return all;
}

struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0: activation block (mc rows x 32 bytes); tmm1..3: weight blocks (8 x 64 bytes);
// tmm4..6: integer sums (mc x 16 int32)
inline void amx_configure(int mc) {
  AmxTileConfig cfg;
  cfg.rows[0] = static_cast<uint8_t>(mc);
  cfg.colsb[0] = kQ8Block;
  for (int t = 1; t <= 3; ++t) {
    cfg.rows[t] = 8;
    cfg.colsb[t] = 64;
  }
  for (int t = 4; t <= 6; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(mc);
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// NG (1..3) consecutive groups against activation rows m0 .. m0 + mc - 1 (mc <= 16, tiles
// configured for mc), all blocks
template <int kType, int NG>
inline void q8_amx_groups(const uint8_t* const* gw, const Q8Act& a, int64_t m0, int mc,
                          float* const* yg, int64_t ldy, const int* rows) {
  constexpr int kGB = kGroupBlockBytes<kType>, kHdr = kGroupHeader<kType>;
  const int64_t nb = a.nb;
  alignas(64) float acc[NG][16][16];
  // software-pipelined: block b's tile work is issued before block b - 1's float work, so the
  // tile store of one block and the vector loads of the other do not wait on each other
  alignas(64) int32_t isum[2][NG][16][16];
  alignas(64) uint8_t wbuf[2][NG][8 * 64];
  std::memset(acc, 0, sizeof(acc));
  const __m512i nib = _mm512_set1_epi8(0x0F);
  auto float_work = [&](int64_t b) {
    const int p = static_cast<int>(b & 1);
    for (int j = 0; j < NG; ++j) {
      __m512 dw, mw;
      q8_block_scales<kType>(gw[j] + b * kGB, dw, mw);
      for (int m = 0; m < mc; ++m) {
        const int64_t i = (m0 + m) * nb + b;
        __m512i ia = _mm512_load_si512(isum[p][j][m]);
        // Q8_0 enters TDPBSSD signed (no +128 bias to undo); Q4_0's -8 offset is corr
        if constexpr (kType == kQ4_0) ia = _mm512_add_epi32(ia, _mm512_set1_epi32(a.corr[i]));
        _mm512_store_ps(acc[j][m],
                        q8_block_acc<kType>(ia, dw, mw, a, i, _mm512_load_ps(acc[j][m])));
      }
    }
  };
  for (int64_t b = 0; b <= nb; ++b) {
    if (b < nb) {
      const int p = static_cast<int>(b & 1);
      _tile_loadd(0, a.row(m0) + b * kQ8Block, a.K);
#define DSPARK_AMX_GROUP(J, TB, TC)                                                               \
  if constexpr (NG > J) {                                                                         \
    q8_prefetch<kGB>(gw[J] + b * kGB);                                                            \
    const uint8_t* qs = gw[J] + b * kGB + kHdr;                                                   \
    if constexpr (kType == kQ8_0) {                                                               \
      _tile_loadd(TB, qs, 64);                                                                    \
    } else {                                                                                      \
      for (int t = 0; t < 4; ++t) {                                                               \
        const __m512i v = _mm512_loadu_si512(qs + 64 * t);                                        \
        _mm512_store_si512(wbuf[p][J] + 64 * t, _mm512_and_si512(v, nib));                        \
        _mm512_store_si512(wbuf[p][J] + 64 * (4 + t),                                             \
                           _mm512_and_si512(_mm512_srli_epi16(v, 4), nib));                       \
      }                                                                                           \
      _tile_loadd(TB, wbuf[p][J], 64);                                                            \
    }                                                                                             \
    _tile_zero(TC);                                                                               \
    if constexpr (kType == kQ8_0) {                                                               \
      _tile_dpbssd(TC, 0, TB);                                                                    \
    } else {                                                                                      \
      _tile_dpbsud(TC, 0, TB);                                                                    \
    }                                                                                             \
    _tile_stored(TC, isum[p][J], 64);                                                             \
  }
      // tile numbers are literals: the intrinsics paste them into the instruction text
      DSPARK_AMX_GROUP(0, 1, 4)
      DSPARK_AMX_GROUP(1, 2, 5)
      DSPARK_AMX_GROUP(2, 3, 6)
#undef DSPARK_AMX_GROUP
    }
    if (b > 0) float_work(b - 1);
  }
  for (int j = 0; j < NG; ++j) {
    const __mmask16 k = rows[j] >= kQ8Group ? static_cast<__mmask16>(0xFFFF)
                                            : static_cast<__mmask16>((1u << rows[j]) - 1u);
    for (int m = 0; m < mc; ++m)
      _mm512_mask_storeu_ps(yg[j] + (m0 + m) * ldy, k, _mm512_load_ps(acc[j][m]));
  }
}

// groups [g0, g1) against every activation row on the tile unit: 3 groups at a time, each
// against 16-row chunks of the activations (the chunks reuse the groups' weights from cache)
template <int kType>
inline void q8_groups_amx(const uint8_t* wp, int64_t g0, int64_t g1, int64_t N, const Q8Act& a,
                          float* yp, int64_t ldy) {
  const int64_t gbytes = static_cast<int64_t>(kGroupBlockBytes<kType>) * a.nb;
  int configured = -1;
  for (int64_t g = g0; g < g1; g += 3) {
    const int ng = static_cast<int>(std::min<int64_t>(3, g1 - g));
    const uint8_t* gw[3];
    float* yg[3];
    int rows[3];
    for (int j = 0; j < ng; ++j) {
      gw[j] = wp + (g + j) * gbytes;
      yg[j] = yp + (g + j) * kQ8Group;
      rows[j] = static_cast<int>(std::min<int64_t>(kQ8Group, N - (g + j) * kQ8Group));
    }
    for (int64_t m0 = 0; m0 < a.M; m0 += 16) {
      const int mc = static_cast<int>(std::min<int64_t>(16, a.M - m0));
      if (mc != configured) {
        amx_configure(mc);
        configured = mc;
      }
      switch (ng) {
        case 3: q8_amx_groups<kType, 3>(gw, a, m0, mc, yg, ldy, rows); break;
        case 2: q8_amx_groups<kType, 2>(gw, a, m0, mc, yg, ldy, rows); break;
        default: q8_amx_groups<kType, 1>(gw, a, m0, mc, yg, ldy, rows); break;
      }
    }
  }
  _tile_release();
}
#endif

inline bool q8_amx_available() {
#if defined(DSPARK_Q8_AMX)
  return amx_permitted();
#else
  return false;
#endif
}

/// rows from which gguf_matmul_q8 uses the tile unit on Q8_0 weights (all formats when
/// ``all_formats``); a negative argument only reads it, 0 turns it off; always 0 where the
/// extension has no AMX path or the kernel refuses it
inline int64_t q8_amx_min_rows(int64_t rows, bool all_formats) {
#if defined(DSPARK_Q8_AMX)
  if (rows >= 0) {
    amx_min_rows_ref() = amx_permitted() ? static_cast<int>(rows) : 0;
    amx_all_formats_ref() = all_formats;
  }
  return amx_min_rows_ref();
#else
  (void)rows;
  (void)all_formats;
  return 0;
#endif
}

// groups [g0, g1) against every activation row, kQ8Cols rows at a time
template <int kType>
inline void q8_groups(const uint8_t* wp, int64_t g0, int64_t g1, int64_t N, const Q8Act& a,
                      float* yp, int64_t ldy) {
  const int64_t gbytes = static_cast<int64_t>(kGroupBlockBytes<kType>) * a.nb;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* gw = wp + g * gbytes;
    const int rows = static_cast<int>(std::min<int64_t>(kQ8Group, N - g * kQ8Group));
    float* yg = yp + g * kQ8Group;
    int64_t c = 0;
    for (; c + kQ8Cols <= a.M; c += kQ8Cols)
      q8_group<kType, kQ8Cols>(gw, a, c, yg + c * ldy, ldy, rows);
    switch (a.M - c) {
      case 3: q8_group<kType, 3>(gw, a, c, yg + c * ldy, ldy, rows); break;
      case 2: q8_group<kType, 2>(gw, a, c, yg + c * ldy, ldy, rows); break;
      case 1: q8_group<kType, 1>(gw, a, c, yg + c * ldy, ldy, rows); break;
      default: break;
    }
  }
}

/// x [M, K] float32 contiguous (M <= 64); w [N, row_bytes] uint8 from gguf_repack_q8 (rows of
/// ``type``: Q4_0, Q4_1 or Q8_0, 16-row interleaved, storage padded to 16 rows); out [M, ldy]
/// float32 contiguous: columns col0 .. col0 + N are overwritten.
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
  const int64_t G = (N + kQ8Group - 1) / kQ8Group;
  TORCH_CHECK(static_cast<int64_t>(w.storage().nbytes()) >=
                  (w.storage_offset() + G * kQ8Group * row_bytes) * w.element_size(),
              "w is not from gguf_repack_q8 (storage not padded to 16 rows)");
  if (M == 0 || N == 0) return;
  Q8Act a;
  quantize_act_q8(x.data_ptr<float>(), M, K, type, a);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = out.data_ptr<float>() + col0;
  const int64_t ldy = out.size(1);
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(kQ8Group * row_bytes, 1));
#if defined(DSPARK_Q8_AMX)
  // Q8_0 only: the nibble formats pay an unpack per block that the tile unit never wins back
  // here, and Q8_0 wins from ~8 rows (49152 x 576 head: 1.24x at 8 rows, 1.46x at 16-32; 0.5x
  // at 1 row; docs/benchmarks.md, session 12)
  const int amx_rows = amx_min_rows_ref();
  if (amx_rows > 0 && M >= amx_rows && (type == kQ8_0 || amx_all_formats_ref())) {
    at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
      switch (type) {
        case kQ4_0: q8_groups_amx<kQ4_0>(wp, g0, g1, N, a, yp, ldy); break;
        case kQ4_1: q8_groups_amx<kQ4_1>(wp, g0, g1, N, a, yp, ldy); break;
        default: q8_groups_amx<kQ8_0>(wp, g0, g1, N, a, yp, ldy); break;
      }
    });
    return;
  }
#endif
  at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
    switch (type) {
      case kQ4_0: q8_groups<kQ4_0>(wp, g0, g1, N, a, yp, ldy); break;
      case kQ4_1: q8_groups<kQ4_1>(wp, g0, g1, N, a, yp, ldy); break;
      default: q8_groups<kQ8_0>(wp, g0, g1, N, a, yp, ldy); break;
    }
  });
}

}  // namespace dspark
