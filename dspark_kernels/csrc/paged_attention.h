// Paged attention of a few new tokens per request over a KV pool read in place through the
// request -> slot table (decode: 1 token; verify: a short chain or tree with a custom mask).
//
// Work item = (request, chunk of new tokens, kv head; or all kv heads when there are enough
// requests to keep the threads busy): its query rows are the new tokens x the query heads that
// share a kv head (GQA), so each K/V row is loaded once for all of them. Keys are visited
// in tiles with an online softmax (running max and sum per query row); nothing is gathered or
// padded. Masked keys are skipped, not zeroed: see the note in paged_attention.
#pragma once
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <vector>

#include "simd.h"

namespace dspark {

inline float dot(const float* a, const float* b, int64_t d) {
  VecF acc;
  int64_t i = 0;
  for (; i + VecF::kWidth <= d; i += VecF::kWidth) acc = fma(VecF::load(a + i), VecF::load(b + i), acc);
  float s = acc.sum();
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float alpha, const float* x, float* y, int64_t d) {
  const VecF a = VecF::set1(alpha);
  int64_t i = 0;
  for (; i + VecF::kWidth <= d; i += VecF::kWidth) fma(a, VecF::load(x + i), VecF::load(y + i)).store(y + i);
  for (; i < d; ++i) y[i] += alpha * x[i];
}

// dot() of four rows a0..a3 with one b: each result is bitwise dot(a_j, b, d) (same per-row
// arithmetic), with b's registers loaded once for the four
inline void dot4(const float* a0, const float* a1, const float* a2, const float* a3,
                 const float* b, int64_t d, float* out, int64_t stride) {
  VecF c0, c1, c2, c3;
  int64_t i = 0;
  for (; i + VecF::kWidth <= d; i += VecF::kWidth) {
    const VecF bv = VecF::load(b + i);
    c0 = fma(VecF::load(a0 + i), bv, c0);
    c1 = fma(VecF::load(a1 + i), bv, c1);
    c2 = fma(VecF::load(a2 + i), bv, c2);
    c3 = fma(VecF::load(a3 + i), bv, c3);
  }
  float s0 = c0.sum(), s1 = c1.sum(), s2 = c2.sum(), s3 = c3.sum();
  for (; i < d; ++i) {
    s0 += a0[i] * b[i];
    s1 += a1[i] * b[i];
    s2 += a2[i] * b[i];
    s3 += a3[i] * b[i];
  }
  out[0] = s0;
  out[stride] = s1;
  out[2 * stride] = s2;
  out[3 * stride] = s3;
}

// y += sum_t p[t] * x_t over n rows x_t = rows[t] (in t order; per element exactly the axpy
// sequence), with y held in NV registers across the rows
template <int NV>
inline void axpy_rows(const float* p, const float* const* rows, int n, float* y) {
  VecF acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = VecF::load(y + j * VecF::kWidth);
  for (int t = 0; t < n; ++t) {
    const VecF a = VecF::set1(p[t]);
    for (int j = 0; j < NV; ++j) acc[j] = fma(a, VecF::load(rows[t] + j * VecF::kWidth), acc[j]);
  }
  for (int j = 0; j < NV; ++j) acc[j].store(y + j * VecF::kWidth);
}

inline void scale_inplace(float alpha, float* y, int64_t d) {
  const VecF a = VecF::set1(alpha);
  int64_t i = 0;
  for (; i + VecF::kWidth <= d; i += VecF::kWidth) (a * VecF::load(y + i)).store(y + i);
  for (; i < d; ++i) y[i] *= alpha;
}

// p[0:n] = exp(s[0:n] - m) in place; returns their sum. Masked entries hold -inf (-> 0).
inline float exp_shift_sum(float* s, int n, float m) {
  const VecF mv = VecF::set1(m);
  VecF acc;
  int i = 0;
  for (; i + VecF::kWidth <= n; i += VecF::kWidth) {
    VecF p = vexp(VecF::load(s + i) - mv);
    p.store(s + i);
    acc = acc + p;
  }
  float sum = acc.sum();
  for (; i < n; ++i) {
    s[i] = std::isinf(s[i]) ? 0.f : std::exp(s[i] - m);
    sum += s[i];
  }
  return sum;
}

constexpr int kKeyTile = 64;
// keys ahead whose K / V rows are prefetched: the pool's rows of one request are scattered
// over per-layer buffers far larger than the caches, so each row would otherwise be a miss
constexpr int kPrefetch = 8;

inline void prefetch_row(const float* p, int64_t d) {
  for (int64_t i = 0; i < d; i += 16) __builtin_prefetch(p + i, 0, 3);
}
constexpr int64_t kTokenChunk = 16;  // new tokens per work item

/// q [T, H, D], k_buf/v_buf [S, KVH, D], req_to_token [R, C], per-request int64 vectors
/// req_pool_indices/seq_lens/ext_lens/q_start [bs], mask_flat uint8 (row-major e x e blocks),
/// mask_offsets [bs] (-1 = causal among the new tokens). Writes out [T, H, D].
inline void paged_attention(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf,
                            const at::Tensor& req_to_token, const at::Tensor& req_pool_indices,
                            const at::Tensor& seq_lens, const at::Tensor& ext_lens,
                            const at::Tensor& q_start, const at::Tensor& mask_flat,
                            const at::Tensor& mask_offsets, double sm_scale, at::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && k_buf.dim() == 3 && v_buf.dim() == 3, "q, k_buf, v_buf must be 3-D");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_buf.scalar_type() == at::kFloat &&
                  v_buf.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "paged_attention: float32 only");
  TORCH_CHECK(q.is_contiguous() && k_buf.is_contiguous() && v_buf.is_contiguous() &&
                  out.is_contiguous() && req_to_token.is_contiguous(),
              "paged_attention: contiguous tensors only");
  TORCH_CHECK(req_to_token.scalar_type() == at::kLong, "req_to_token must be int64");
  const int64_t H = q.size(1), D = q.size(2), KVH = k_buf.size(1);
  TORCH_CHECK(k_buf.size(2) == D && H % KVH == 0, "head shapes do not match");
  const int64_t G = H / KVH, bs = seq_lens.size(0), C = req_to_token.size(1);
  const int64_t* rpi = req_pool_indices.data_ptr<int64_t>();
  const int64_t* seq = seq_lens.data_ptr<int64_t>();
  const int64_t* ext = ext_lens.data_ptr<int64_t>();
  const int64_t* qst = q_start.data_ptr<int64_t>();
  const int64_t* moff = mask_offsets.data_ptr<int64_t>();
  const uint8_t* mflat = mask_flat.numel() ? mask_flat.data_ptr<uint8_t>() : nullptr;
  const int64_t* table = req_to_token.data_ptr<int64_t>();
  const float* qp = q.data_ptr<float>();
  const float* kp = k_buf.data_ptr<float>();
  const float* vp = v_buf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = static_cast<float>(sm_scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // A row's keys, in order: the prefix, then the new tokens its mask lets it see. Keys are
  // visited in tiles of kKeyTile over that compacted order, so a token's output is computed
  // with exactly the arithmetic of decoding it alone on a contiguous sequence of the same keys
  // (a verified token is bitwise the token decoded alone: speculative greedy output equals
  // plain greedy output whatever the arithmetic amplifies downstream). Tiles wholly inside the
  // prefix are shared by all rows of a work item; the rest is visited per new token.
  // work items: (request, chunk of at most kTokenChunk new tokens, kv head); a chunk's rows
  // are computed exactly as in any other split, so prefill chunks parallelise too
  // With few requests (one verify chain) the chunks get smaller until there are enough items
  // for every thread (a prefix tile is then read once per chunk, from cache).
  const int64_t threads = at::get_num_threads();
  int64_t chunk = kTokenChunk;
  auto count_chunks = [&](int64_t c) {
    int64_t n = 0;
    for (int64_t b = 0; b < bs; ++b) n += (ext[b] + c - 1) / c;
    return n;
  };
  // work items wanted per thread before chunks are halved: 2 measured best for one request's
  // 2-8 verify tokens on 2 cores (attention 20-30 % faster than 4: rows of 4 tokens keep the
  // 4-row dot; 1 leaves a thread idle); DSPARK_ATTN_ITEMS_PER_THREAD overrides it
  static const int64_t items_per_thread = [] {
    const char* v = std::getenv("DSPARK_ATTN_ITEMS_PER_THREAD");
    return v ? std::max<int64_t>(1, std::atoll(v)) : int64_t{2};
  }();
  while (chunk > 1 && count_chunks(chunk) * KVH < items_per_thread * threads) chunk = (chunk + 1) / 2;
  std::vector<int64_t> item_b, item_i0;
  for (int64_t b = 0; b < bs; ++b)
    for (int64_t i0 = 0; i0 < ext[b]; i0 += chunk) {
      item_b.push_back(b);
      item_i0.push_back(i0);
    }
  const int64_t n_chunks = static_cast<int64_t>(item_b.size());
  // kv heads per work item: one (threads over heads too) when there are few (request, chunk)
  // pairs, all of them when there are enough pairs to keep every thread busy: a slot's K / V
  // rows of all heads are then read together, one contiguous stream per request. Each head's
  // arithmetic is the same either way (its own scores, softmax state and accumulation order).
  const int64_t HG = n_chunks >= 2 * at::get_num_threads() ? KVH : 1;
  const int64_t n_groups = KVH / HG;
  at::parallel_for(0, n_chunks * n_groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs, acc, m, l, s;
    std::vector<int64_t> keys;  // slots of one new token's keys past the shared tiles
    for (int64_t item = begin; item < end; ++item) {
      const int64_t ci = item / n_groups, h0 = (item % n_groups) * HG, b = item_b[ci],
                    i0 = item_i0[ci];
      const int64_t e = ext[b], len = seq[b], prefix = len - e;
      const int64_t i1 = std::min(e, i0 + chunk), rows = (i1 - i0) * G;
      TORCH_CHECK(len <= C && e >= 1, "bad sequence length");
      const int64_t* slots = table + rpi[b] * C;
      const uint8_t* mask = moff[b] >= 0 ? mflat + moff[b] : nullptr;
      // state of head h0 + hh, row r at index hh * rows + r
      qs.assign(HG * rows * D, 0.f);
      acc.assign(HG * rows * D, 0.f);
      m.assign(HG * rows, neg_inf);
      l.assign(HG * rows, 0.f);
      s.resize(HG * rows * kKeyTile);
      for (int64_t hh = 0; hh < HG; ++hh)
        for (int64_t i = i0; i < i1; ++i)  // row r = (i - i0) * G + g
          for (int64_t g = 0; g < G; ++g) {
            const float* src = qp + ((qst[b] + i) * H + (h0 + hh) * G + g) * D;
            float* dst = qs.data() + (hh * rows + (i - i0) * G + g) * D;
            for (int64_t t = 0; t < D; ++t) dst[t] = src[t] * scale;
          }
      // one tile of n keys (slot list ks) for rows [r0, r1) of every head of the item: scores,
      // online softmax, values
      auto tile = [&](const int64_t* ks, int n, int64_t r0, int64_t r1) {
        for (int t = 0; t < n; ++t) {
          if (t + kPrefetch < n) {
            prefetch_row(kp + (ks[t + kPrefetch] * KVH + h0) * D, HG * D);
            prefetch_row(vp + (ks[t + kPrefetch] * KVH + h0) * D, HG * D);
          }
          for (int64_t hh = 0; hh < HG; ++hh) {
            const float* krow = kp + (ks[t] * KVH + h0 + hh) * D;
            const float* qh = qs.data() + hh * rows * D;
            float* sh = s.data() + hh * rows * kKeyTile + t;
            int64_t r = r0;
            for (; r + 4 <= r1; r += 4)
              dot4(qh + r * D, qh + (r + 1) * D, qh + (r + 2) * D, qh + (r + 3) * D, krow, D,
                   sh + r * kKeyTile, kKeyTile);
            for (; r < r1; ++r) sh[r * kKeyTile] = dot(qh + r * D, krow, D);
          }
        }
        for (int64_t hh = 0; hh < HG; ++hh)
          for (int64_t r = hh * rows + r0; r < hh * rows + r1; ++r) {
            float* sr = s.data() + r * kKeyTile;
            float tmax = neg_inf;
            for (int t = 0; t < n; ++t) tmax = std::max(tmax, sr[t]);
            const float m_new = std::max(m[r], tmax);
            if (m_new > m[r]) {
              const float c = m[r] == neg_inf ? 0.f : std::exp(m[r] - m_new);
              scale_inplace(c, acc.data() + r * D, D);
              l[r] *= c;
              m[r] = m_new;
            }
            l[r] += exp_shift_sum(sr, n, m_new);
          }
        // values: per row, acc += p_t * v_t over the tile's keys in order, held in registers
        const float* vrows[kKeyTile];
        for (int64_t hh = 0; hh < HG; ++hh) {
          for (int t = 0; t < n; ++t) vrows[t] = vp + (ks[t] * KVH + h0 + hh) * D;
          for (int64_t r = hh * rows + r0; r < hh * rows + r1; ++r) {
            const float* pr = s.data() + r * kKeyTile;
            float* ar = acc.data() + r * D;
            if (D == 4 * VecF::kWidth) {
              axpy_rows<4>(pr, vrows, n, ar);
            } else if (D == 8 * VecF::kWidth) {
              axpy_rows<8>(pr, vrows, n, ar);
            } else {
              for (int t = 0; t < n; ++t) axpy(pr[t], vrows[t], ar, D);
            }
          }
        }
      };
      const int64_t shared_end = (prefix / kKeyTile) * kKeyTile;
      for (int64_t j0 = 0; j0 < shared_end; j0 += kKeyTile) tile(slots + j0, kKeyTile, 0, rows);
      for (int64_t i = i0; i < i1; ++i) {
        keys.assign(slots + shared_end, slots + prefix);
        for (int64_t jj = 0; jj < e; ++jj)
          if (mask ? mask[i * e + jj] != 0 : jj <= i) keys.push_back(slots[prefix + jj]);
        const int64_t nk = static_cast<int64_t>(keys.size());
        for (int64_t c0 = 0; c0 < nk; c0 += kKeyTile)
          tile(keys.data() + c0, static_cast<int>(std::min<int64_t>(kKeyTile, nk - c0)),
               (i - i0) * G, (i - i0 + 1) * G);
      }
      for (int64_t hh = 0; hh < HG; ++hh)
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t g = 0; g < G; ++g) {
            const int64_t r = hh * rows + (i - i0) * G + g;
            const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
            float* dst = op + ((qst[b] + i) * H + (h0 + hh) * G + g) * D;
            const float* a = acc.data() + r * D;
            for (int64_t t = 0; t < D; ++t) dst[t] = a[t] * inv;
          }
    }
  });
}

}  // namespace dspark
