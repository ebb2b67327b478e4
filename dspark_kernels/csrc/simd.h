// Minimal SIMD wrapper: one float vector type chosen at compile time (AVX-512, AVX2+FMA, scalar).
// The extension is compiled on the machine that runs it with flags for its instruction set
// (see kernels/cpu_ops.py), so exactly one branch below is live.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace dspark {

#if defined(__AVX512F__)
struct VecF {
  static constexpr int kWidth = 16;
  __m512 v;
  VecF() : v(_mm512_setzero_ps()) {}
  explicit VecF(__m512 x) : v(x) {}
  static VecF set1(float x) { return VecF(_mm512_set1_ps(x)); }
  static VecF load(const float* p) { return VecF(_mm512_loadu_ps(p)); }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  float sum() const { return _mm512_reduce_add_ps(v); }
  float max() const { return _mm512_reduce_max_ps(v); }
};
inline VecF fma(VecF a, VecF b, VecF c) { return VecF(_mm512_fmadd_ps(a.v, b.v, c.v)); }
inline VecF operator*(VecF a, VecF b) { return VecF(_mm512_mul_ps(a.v, b.v)); }
inline VecF operator+(VecF a, VecF b) { return VecF(_mm512_add_ps(a.v, b.v)); }
inline VecF operator-(VecF a, VecF b) { return VecF(_mm512_sub_ps(a.v, b.v)); }
inline VecF operator/(VecF a, VecF b) { return VecF(_mm512_div_ps(a.v, b.v)); }
inline VecF vmax(VecF a, VecF b) { return VecF(_mm512_max_ps(a.v, b.v)); }
inline VecF vmin(VecF a, VecF b) { return VecF(_mm512_min_ps(a.v, b.v)); }
inline VecF vround(VecF a) {
  return VecF(_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// 2^n for integral-valued float n in [-127, 127]
inline VecF pow2i(VecF n) {
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127)),
                                23);
  return VecF(_mm512_castsi512_ps(e));
}
#elif defined(__AVX2__) && defined(__FMA__)
struct VecF {
  static constexpr int kWidth = 8;
  __m256 v;
  VecF() : v(_mm256_setzero_ps()) {}
  explicit VecF(__m256 x) : v(x) {}
  static VecF set1(float x) { return VecF(_mm256_set1_ps(x)); }
  static VecF load(const float* p) { return VecF(_mm256_loadu_ps(p)); }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  float sum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float max() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
inline VecF fma(VecF a, VecF b, VecF c) { return VecF(_mm256_fmadd_ps(a.v, b.v, c.v)); }
inline VecF operator*(VecF a, VecF b) { return VecF(_mm256_mul_ps(a.v, b.v)); }
inline VecF operator+(VecF a, VecF b) { return VecF(_mm256_add_ps(a.v, b.v)); }
inline VecF operator-(VecF a, VecF b) { return VecF(_mm256_sub_ps(a.v, b.v)); }
inline VecF operator/(VecF a, VecF b) { return VecF(_mm256_div_ps(a.v, b.v)); }
inline VecF vmax(VecF a, VecF b) { return VecF(_mm256_max_ps(a.v, b.v)); }
inline VecF vmin(VecF a, VecF b) { return VecF(_mm256_min_ps(a.v, b.v)); }
inline VecF vround(VecF a) {
  return VecF(_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline VecF pow2i(VecF n) {
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)),
                                23);
  return VecF(_mm256_castsi256_ps(e));
}
#else
struct VecF {
  static constexpr int kWidth = 1;
  float v;
  VecF() : v(0.f) {}
  explicit VecF(float x) : v(x) {}
  static VecF set1(float x) { return VecF(x); }
  static VecF load(const float* p) { return VecF(*p); }
  void store(float* p) const { *p = v; }
  float sum() const { return v; }
  float max() const { return v; }
};
inline VecF fma(VecF a, VecF b, VecF c) { return VecF(std::fma(a.v, b.v, c.v)); }
inline VecF operator*(VecF a, VecF b) { return VecF(a.v * b.v); }
inline VecF operator+(VecF a, VecF b) { return VecF(a.v + b.v); }
inline VecF operator-(VecF a, VecF b) { return VecF(a.v - b.v); }
inline VecF operator/(VecF a, VecF b) { return VecF(a.v / b.v); }
inline VecF vmax(VecF a, VecF b) { return VecF(a.v > b.v ? a.v : b.v); }
inline VecF vmin(VecF a, VecF b) { return VecF(a.v < b.v ? a.v : b.v); }
inline VecF vround(VecF a) { return VecF(std::nearbyint(a.v)); }
inline VecF pow2i(VecF n) { return VecF(std::ldexp(1.f, static_cast<int>(n.v))); }
#endif

// exp(x) to ~1 ulp-ish (relative error < 2e-7 over the clamped range); inputs below -87 give ~0.
inline VecF vexp(VecF x) {
  x = vmin(vmax(x, VecF::set1(-87.0f)), VecF::set1(88.0f));
  const VecF log2e = VecF::set1(1.44269504088896341f);
  VecF n = vround(x * log2e);
  // r = x - n*ln2 (ln2 split in two for precision)
  VecF r = fma(n, VecF::set1(-0.693145751953125f), x);
  r = fma(n, VecF::set1(-1.428606765330187045e-06f), r);
  // exp(r) on |r| <= ln2/2: degree-6 Taylor/minimax polynomial
  VecF p = VecF::set1(1.3888889e-3f);
  p = fma(p, r, VecF::set1(8.3333333e-3f));
  p = fma(p, r, VecF::set1(4.1666667e-2f));
  p = fma(p, r, VecF::set1(1.6666667e-1f));
  p = fma(p, r, VecF::set1(0.5f));
  p = fma(p, r, VecF::set1(1.0f));
  p = fma(p, r, VecF::set1(1.0f));
  return p * pow2i(n);
}

inline float fp16_to_fp32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 113;
      while ((mant & 0x400u) == 0) { mant <<= 1; --exp; }
      bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

inline uint16_t read_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

}  // namespace dspark
