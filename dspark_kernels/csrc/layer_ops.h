// The small per-layer operations of a decoder layer, fused so that a decode step issues a few
// calls per layer instead of ~25 torch ops (on 2 CPU cores each torch op costs a few
// microseconds of dispatch, which added up to a third of a GGUF decode step):
//   rms_norm         y = x * rsqrt(mean(x^2) + eps) * w, per row
//   qkv_rope_store   split the fused q/k/v projection, optional per-head q/k RMSNorm (Qwen3),
//                    rotary embedding (HF rotate-half) on q and k, k/v written to the KV pool
//                    slots; returns q [n, heads, head_dim]
//   silu_mul         y = silu(gate) * up for the fused [gate | up] projection
// Every row is computed on its own with a fixed order of operations, so a token's result does
// not depend on the other rows of the call (decode and verification stay bitwise alike).
#pragma once
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>

#include "simd.h"

namespace dspark {

// sum of squares of x[0..d) in a fixed order: vector lanes, then the lanes' sum, then the tail
inline float sum_squares(const float* x, int64_t d) {
  VecF acc;
  int64_t i = 0;
  for (; i + VecF::kWidth <= d; i += VecF::kWidth) {
    const VecF v = VecF::load(x + i);
    acc = fma(v, v, acc);
  }
  float s = acc.sum();
  for (; i < d; ++i) s += x[i] * x[i];
  return s;
}

// y = x * r * w over d elements (r = the row's 1 / rms)
inline void scale_by_weight(const float* x, float r, const float* w, float* y, int64_t d) {
  const VecF rv = VecF::set1(r);
  int64_t i = 0;
  for (; i + VecF::kWidth <= d; i += VecF::kWidth)
    (VecF::load(x + i) * rv * VecF::load(w + i)).store(y + i);
  for (; i < d; ++i) y[i] = x[i] * r * w[i];
}

inline float inv_rms(const float* x, int64_t d, double eps) {
  const float ms = sum_squares(x, d) / static_cast<float>(d);
  return 1.f / std::sqrt(ms + static_cast<float>(eps));
}

inline void check_f32_contig(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous float32 CPU tensor");
}

/// x [n, d] -> rms-normalised rows times w [d]
inline at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_f32_contig(x, "x");
  check_f32_contig(w, "w");
  const int64_t d = x.size(-1), n = d ? x.numel() / d : 0;
  TORCH_CHECK(w.numel() == d, "rms_norm weight has ", w.numel(), " elements, rows have ", d);
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)),
                   [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      scale_by_weight(xp + r * d, inv_rms(xp + r * d, d, eps), wp, yp + r * d, d);
  });
  return y;
}

// HF rotate-half on one head of d values in place: for i < d/2,
// x[i] = x[i] c[i] - x[i+h] s[i] and x[i+h] = x[i+h] c[i+h] + x[i] s[i+h]
inline void rope_head(float* x, const float* c, const float* s, int64_t d) {
  const int64_t h = d / 2;
  int64_t i = 0;
  for (; i + VecF::kWidth <= h; i += VecF::kWidth) {
    const VecF a = VecF::load(x + i), b = VecF::load(x + h + i);
    (a * VecF::load(c + i) - b * VecF::load(s + i)).store(x + i);
    (b * VecF::load(c + h + i) + a * VecF::load(s + h + i)).store(x + h + i);
  }
  for (; i < h; ++i) {
    const float a = x[i], b = x[h + i];
    x[i] = a * c[i] - b * s[i];
    x[h + i] = b * c[h + i] + a * s[h + i];
  }
}

/// qkv [n, (H + 2 KV) * d] (q heads, then k heads, then v heads); cos, sin [n, d]; q_norm /
/// k_norm: [d] weights or empty tensors (no q/k norm); k_buf, v_buf [slots, KV, d] pool buffers;
/// loc [n] int64 slots. Writes k and v of row i to slot loc[i]; returns q [n, H, d].
inline at::Tensor qkv_rope_store(const at::Tensor& qkv, const at::Tensor& cos,
                                 const at::Tensor& sin, const at::Tensor& q_norm,
                                 const at::Tensor& k_norm, double eps, at::Tensor& k_buf,
                                 at::Tensor& v_buf, const at::Tensor& loc, int64_t num_heads,
                                 int64_t num_kv_heads) {
  check_f32_contig(qkv, "qkv");
  check_f32_contig(cos, "cos");
  check_f32_contig(sin, "sin");
  check_f32_contig(k_buf, "k_buf");
  check_f32_contig(v_buf, "v_buf");
  TORCH_CHECK(loc.scalar_type() == at::kLong && loc.is_contiguous(), "loc must be int64");
  const int64_t n = qkv.size(0), H = num_heads, KV = num_kv_heads;
  const int64_t d = k_buf.size(-1);
  TORCH_CHECK(d % 2 == 0 && qkv.size(1) == (H + 2 * KV) * d, "qkv width does not match heads");
  TORCH_CHECK(cos.numel() == n * d && sin.numel() == n * d, "cos/sin must be [n, head_dim]");
  TORCH_CHECK(k_buf.size(1) == KV && v_buf.sizes() == k_buf.sizes(), "bad KV buffer shape");
  TORCH_CHECK(loc.numel() == n, "loc must have one slot per row");
  const bool qk_norm = q_norm.numel() > 0;
  if (qk_norm) {
    check_f32_contig(q_norm, "q_norm");
    check_f32_contig(k_norm, "k_norm");
    TORCH_CHECK(q_norm.numel() == d && k_norm.numel() == d, "q/k norm weights must be [d]");
  }
  const int64_t slots = k_buf.size(0);
  const int64_t* lp = loc.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(lp[i] >= 0 && lp[i] < slots, "KV slot ", lp[i], " out of range");
  at::Tensor q = at::empty({n, H, d}, qkv.options());
  const float* src = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const float* qn = qk_norm ? q_norm.data_ptr<float>() : nullptr;
  const float* kn = qk_norm ? k_norm.data_ptr<float>() : nullptr;
  float* qp = q.data_ptr<float>();
  float* kb = k_buf.data_ptr<float>();
  float* vb = v_buf.data_ptr<float>();
  const int64_t width = (H + 2 * KV) * d;
  at::parallel_for(0, n, std::max<int64_t>(1, 8192 / std::max<int64_t>(width, 1)),
                   [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float* row = src + i * width;
      const float* c = cp + i * d;
      const float* s = sp + i * d;
      float* qrow = qp + i * H * d;
      float* krow = kb + lp[i] * KV * d;
      float* vrow = vb + lp[i] * KV * d;
      for (int64_t h = 0; h < H; ++h) {
        float* dst = qrow + h * d;
        const float* x = row + h * d;
        if (qk_norm) scale_by_weight(x, inv_rms(x, d, eps), qn, dst, d);
        else std::copy(x, x + d, dst);
        rope_head(dst, c, s, d);
      }
      for (int64_t h = 0; h < KV; ++h) {
        float* dst = krow + h * d;
        const float* x = row + (H + h) * d;
        if (qk_norm) scale_by_weight(x, inv_rms(x, d, eps), kn, dst, d);
        else std::copy(x, x + d, dst);
        rope_head(dst, c, s, d);
      }
      std::copy(row + (H + KV) * d, row + width, vrow);
    }
  });
  return q;
}

/// gu [n, 2 I] = [gate | up] -> silu(gate) * up [n, I]
inline at::Tensor silu_mul(const at::Tensor& gu) {
  check_f32_contig(gu, "gu");
  TORCH_CHECK(gu.dim() == 2 && gu.size(1) % 2 == 0, "gu must be [n, 2 * intermediate]");
  const int64_t n = gu.size(0), I = gu.size(1) / 2;
  at::Tensor y = at::empty({n, I}, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // vectorised exp (simd.h vexp, ~1 ulp of float32 against std::exp); few rows stay on one
  // thread (waking the pool costs more than the work)
  at::parallel_for(0, n, std::max<int64_t>(1, 32768 / std::max<int64_t>(I, 1)),
                   [&](int64_t b, int64_t e) {
    const VecF one = VecF::set1(1.f), zero = VecF::set1(0.f);
    for (int64_t r = b; r < e; ++r) {
      const float* g = gp + r * 2 * I;
      const float* u = g + I;
      float* o = yp + r * I;
      int64_t i = 0;
      for (; i + VecF::kWidth <= I; i += VecF::kWidth) {
        const VecF gv = VecF::load(g + i);
        const VecF den = one + vexp(zero - gv);
        (gv / den * VecF::load(u + i)).store(o + i);
      }
      for (; i < I; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return y;
}

}  // namespace dspark
