// A Llama-family decoder stack run entirely in C++ for forwards on the paged attention kernel
// with every projection on Q8-kernel blocks: one call per forward instead of ~10 Python-level
// calls per layer (on 2 CPU cores the Python and dispatch cost of those calls was a fifth of a
// decode step). Each layer is exactly the fused Python path (DecoderLayer.forward_fused) built
// from the same kernels in the same order:
//   h = rms_norm(x); qkv = h W_qkv (+ bias); q = qkv_rope_store(qkv -> pool); o = attention(q)
//   x = x + o W_o; h = rms_norm(x); x = x + silu_mul(h W_gate_up) W_down
// so its results are bitwise those of that path (tested). Weights are registered once
// (add_layer); per forward only the batch's tensors cross from Python.
#pragma once
#include <torch/extension.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <vector>

#include "gguf_q8.h"
#include "layer_ops.h"
#include "paged_attention.h"

namespace dspark {

struct Q8Linear {
  at::Tensor w;  // repacked blocks [N, row_bytes]
  int64_t type = 0;
  int64_t out_features() const { return w.size(0); }
};

// y = x W^T on the Q8 kernel, in calls of at most kMaxRows rows (as GGUFLinear.quant_forward)
inline at::Tensor q8_linear(const at::Tensor& x, const Q8Linear& lin) {
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, lin.out_features()}, x.options());
  if (m <= kMaxRows) {
    gguf_matmul_q8(x, lin.w, lin.type, y, 0);
    return y;
  }
  for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
    const int64_t r1 = std::min(m, r0 + kMaxRows);
    at::Tensor ys = y.narrow(0, r0, r1 - r0);  // contiguous rows
    gguf_matmul_q8(x.narrow(0, r0, r1 - r0), lin.w, lin.type, ys, 0);
  }
  return y;
}

// The DSpark drafter's per-step context update in one call: h = rms_norm(aux W_fc); per draft
// layer kv = h W_kv (k and v rows stacked), then k norm + rotary + store of k and v into that
// layer's pool buffers at loc (qkv_rope_store with no query heads). The same kernels in the
// same order as the Python fast path (DSparkWorker.on_target_forward), so bitwise its result.
inline void draft_context_update(const at::Tensor& aux, const at::Tensor& fc_w, int64_t fc_type,
                                 const at::Tensor& norm_w, double eps,
                                 const std::vector<at::Tensor>& kv_w,
                                 const std::vector<int64_t>& kv_type,
                                 const std::vector<at::Tensor>& k_norm, double k_eps,
                                 std::vector<at::Tensor> k_bufs, std::vector<at::Tensor> v_bufs,
                                 const at::Tensor& cos, const at::Tensor& sin,
                                 const at::Tensor& loc, int64_t num_kv_heads) {
  const size_t n = kv_w.size();
  TORCH_CHECK(kv_type.size() == n && k_norm.size() == n && k_bufs.size() == n &&
                  v_bufs.size() == n, "one kv weight, type, k norm and buffer pair per layer");
  TORCH_CHECK(q8_supported(fc_type), "fc is not a Q8-kernel weight");
  const at::Tensor h = rms_norm(q8_linear(aux.contiguous(), {fc_w, fc_type}), norm_w, eps);
  for (size_t l = 0; l < n; ++l) {
    TORCH_CHECK(q8_supported(kv_type[l]), "kv is not a Q8-kernel weight");
    const at::Tensor kv = q8_linear(h, {kv_w[l], kv_type[l]});
    qkv_rope_store(kv, cos, sin, k_norm[l], k_norm[l], k_eps, k_bufs[l], v_bufs[l], loc, 0,
                   num_kv_heads);
  }
}

// First maximum of a[c] + b[c] over c < n (torch.argmax of the sum: the first NaN wins when
// there is one). One vector pass sums into tmp and keeps the running maximum; a sum that is not
// finite anywhere (NaN or +-inf, seen as a NaN in sum * 0) takes the exact scalar loop instead.
inline int64_t add_argmax(const float* a, const float* b, int64_t n, float* tmp) {
  int64_t c = 0;
  float m = -INFINITY;
  bool finite = true;
  if (n >= VecF::kWidth) {
    VecF vm = VecF::set1(-INFINITY), probe = VecF::set1(0.0f);
    const VecF zero = VecF::set1(0.0f);
    for (; c + VecF::kWidth <= n; c += VecF::kWidth) {
      const VecF v = VecF::load(a + c) + VecF::load(b + c);
      v.store(tmp + c);
      vm = vmax(vm, v);
      probe = fma(v, zero, probe);
    }
    m = vm.max();
    finite = std::isfinite(probe.sum());
  }
  for (; c < n; ++c) {
    tmp[c] = a[c] + b[c];
    finite = finite && std::isfinite(tmp[c]);
    m = tmp[c] > m ? tmp[c] : m;
  }
  if (finite) {
    for (int64_t i = 0; i < n; ++i)
      if (tmp[i] == m) return i;
  }
  int64_t best = 0;  // the scalar loop, NaN- and inf-exact
  float bv = a[0] + b[0];
  for (int64_t i = 1; i < n && !std::isnan(bv); ++i) {
    const float v = a[i] + b[i];
    if (v > bv || std::isnan(v)) {
      bv = v;
      best = i;
    }
  }
  return best;
}

// The DSpark drafter's greedy chain with a vanilla Markov head, left to right in one call: for
// draft j, row r's logits are base[r, j] + W2 e (e = W1[prev_r], W2 on Q8 blocks, the token
// map's rows), its column the first maximum (torch.argmax), its token ids[column] (the column
// itself when ids is empty), which becomes prev_r. The same kernel, add and argmax as
// DSparkDrafter.sample_chain's Python loop, so the same tokens. base [bs, >= k, Vm] float32
// contiguous; w1 [V, R] float32; anchors [bs] int64. Returns tokens [bs, k] int64.
// cache [C, Vm] float32 + tags [C] int64 (-1: empty), owned by the caller and kept across calls,
// hold W2 e rows by previous token (slot = token % C): the bias depends on the previous token
// only, and the kernel computes every row on its own (a row's result does not depend on the
// other rows of the call, tested), so a cached row is bitwise the computed one. Empty tensors:
// no cache.
inline at::Tensor markov_greedy_chain(const at::Tensor& base, int64_t k, const at::Tensor& w1,
                                      const at::Tensor& w2, int64_t w2_type,
                                      const at::Tensor& ids, const at::Tensor& anchors,
                                      const at::Tensor& cache, const at::Tensor& tags) {
  TORCH_CHECK(base.dim() == 3 && base.scalar_type() == at::kFloat && base.is_contiguous(),
              "base must be float32 [bs, k, Vm] contiguous");
  TORCH_CHECK(w1.dim() == 2 && w1.scalar_type() == at::kFloat && w1.is_contiguous(),
              "w1 must be float32 [V, R] contiguous");
  TORCH_CHECK(anchors.scalar_type() == at::kLong && ids.scalar_type() == at::kLong,
              "anchors and ids must be int64");
  const int64_t bs = base.size(0), kmax = base.size(1), vm = base.size(2), R = w1.size(1);
  const int64_t V = w1.size(0);
  TORCH_CHECK(k >= 0 && k <= kmax && anchors.numel() == bs, "bad chain length or anchors");
  TORCH_CHECK(ids.numel() == 0 || ids.numel() == vm, "ids must map every column");
  TORCH_CHECK(w2.size(0) == vm, "W2 must have one row per column");
  const int64_t C = cache.numel() ? cache.size(0) : 0;
  TORCH_CHECK(C == 0 || (cache.dim() == 2 && cache.size(1) == vm && cache.is_contiguous() &&
                         cache.scalar_type() == at::kFloat && tags.numel() == C &&
                         tags.scalar_type() == at::kLong && tags.is_contiguous()),
              "cache must be float32 [C, Vm] with int64 tags [C]");
  at::Tensor tokens = at::empty({bs, k}, anchors.options());
  if (bs == 0 || k == 0) return tokens;
  const int64_t* idp = ids.numel() ? ids.data_ptr<int64_t>() : nullptr;
  const float* bp = base.data_ptr<float>();
  const float* w1p = w1.data_ptr<float>();
  float* cp = C ? cache.data_ptr<float>() : nullptr;
  int64_t* tagp = C ? tags.data_ptr<int64_t>() : nullptr;
  int64_t* tp = tokens.data_ptr<int64_t>();
  std::vector<int64_t> prev(anchors.data_ptr<int64_t>(), anchors.data_ptr<int64_t>() + bs);
  std::vector<const float*> row_bias(bs);
  std::vector<int64_t> miss;  // rows whose bias is computed this step
  std::vector<float> tmp(vm);
  const Q8Linear w2l{w2, w2_type};
  for (int64_t j = 0; j < k; ++j) {
    miss.clear();
    for (int64_t r = 0; r < bs; ++r) {
      TORCH_CHECK(prev[r] >= 0 && prev[r] < V, "token id out of the Markov embedding");
      const int64_t slot = C ? prev[r] % C : 0;
      if (C && tagp[slot] == prev[r]) {
        row_bias[r] = cp + slot * vm;
      } else {
        miss.push_back(r);
      }
    }
    at::Tensor bias;
    if (!miss.empty()) {
      const int64_t nm = static_cast<int64_t>(miss.size());
      at::Tensor e = at::empty({nm, R}, base.options());
      float* ep = e.data_ptr<float>();
      for (int64_t i = 0; i < nm; ++i)
        std::memcpy(ep + i * R, w1p + prev[miss[i]] * R, R * sizeof(float));
      bias = q8_linear(e, w2l);  // [nm, Vm]
      const float* biasp = bias.data_ptr<float>();
      for (int64_t i = 0; i < nm; ++i) row_bias[miss[i]] = biasp + i * vm;
    }
    for (int64_t r = 0; r < bs; ++r) {
      const int64_t best = add_argmax(bp + (r * kmax + j) * vm, row_bias[r], vm, tmp.data());
      tp[r * k + j] = idp ? idp[best] : best;
    }
    // into the cache only after this step's argmaxes (a miss may take the slot of a hit), then
    // the drawn tokens become the previous ones
    for (size_t i = 0; C && i < miss.size(); ++i) {
      const int64_t tok = prev[miss[i]], slot = tok % C;
      std::memcpy(cp + slot * vm, row_bias[miss[i]], vm * sizeof(float));
      tagp[slot] = tok;
    }
    for (int64_t r = 0; r < bs; ++r) prev[r] = tp[r * k + j];
  }
  return tokens;
}

struct StackLayer {
  at::Tensor ln1, ln2, q_norm, k_norm, qkv_bias;  // q/k norm and bias: empty when absent
  double eps = 1e-6, qk_eps = 1e-6, scale = 1.0;
  int64_t num_heads = 0, num_kv_heads = 0;
  Q8Linear qkv, o, gate_up, down;
  at::Tensor k_buf, v_buf;
};

class DecoderStack {
 public:
  void add_layer(at::Tensor ln1, at::Tensor ln2, double eps, at::Tensor q_norm, at::Tensor k_norm,
                 double qk_eps, at::Tensor qkv_w, int64_t qkv_type, at::Tensor qkv_bias,
                 at::Tensor o_w, int64_t o_type, at::Tensor gu_w, int64_t gu_type,
                 at::Tensor down_w, int64_t down_type, int64_t num_heads, int64_t num_kv_heads,
                 double scale, at::Tensor k_buf, at::Tensor v_buf) {
    StackLayer l;
    l.ln1 = ln1.contiguous();
    l.ln2 = ln2.contiguous();
    l.q_norm = q_norm.contiguous();
    l.k_norm = k_norm.contiguous();
    l.qkv_bias = qkv_bias.contiguous();
    l.eps = eps;
    l.qk_eps = qk_eps;
    l.scale = scale;
    l.num_heads = num_heads;
    l.num_kv_heads = num_kv_heads;
    l.qkv = {qkv_w, qkv_type};
    l.o = {o_w, o_type};
    l.gate_up = {gu_w, gu_type};
    l.down = {down_w, down_type};
    for (const Q8Linear* lin : {&l.qkv, &l.o, &l.gate_up, &l.down})
      TORCH_CHECK(q8_supported(lin->type) && lin->w.is_contiguous(), "not a Q8-kernel weight");
    l.k_buf = k_buf;
    l.v_buf = v_buf;
    layers_.push_back(std::move(l));
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  void set_profile(bool on) { profile_ = on; }
  // seconds spent in matmuls / attention / everything else since the last call, and reset
  std::vector<double> take_times() {
    std::vector<double> t = {t_matmul_, t_attention_, t_other_};
    t_matmul_ = t_attention_ = t_other_ = 0.0;
    return t;
  }

  /// x [n, hidden] (embeddings); cos, sin [n, head_dim]; loc [n] int64 KV slots; the paged
  /// attention metadata; capture: layer ids whose outputs to return. Returns [x after the last
  /// layer (before the final norm)], and with capture a second tensor [n, capture.size() *
  /// hidden]: the captured outputs side by side in ``capture`` order (written in place as each
  /// layer finishes: no per-layer copy and concatenation afterwards).
  std::vector<at::Tensor> forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin,
                                  const at::Tensor& loc, const at::Tensor& req_to_token,
                                  const at::Tensor& req_pool_indices, const at::Tensor& seq_lens,
                                  const at::Tensor& ext_lens, const at::Tensor& q_start,
                                  const at::Tensor& mask_flat, const at::Tensor& mask_offsets,
                                  const std::vector<int64_t>& capture) {
    check_f32_contig(x, "x");
    x = x.clone();  // the residual stream, updated in place (no new tensor per residual add)
    const int64_t n = x.size(0), hidden = x.size(1);
    const int64_t n_cap = static_cast<int64_t>(capture.size());
    at::Tensor aux = n_cap ? at::empty({n, n_cap * hidden}, x.options()) : at::Tensor();
    std::vector<bool> seen(capture.size(), false);
    using clock = std::chrono::steady_clock;
    auto t = clock::now();
    auto lap = [&](double& bucket) {
      if (!profile_) return;
      const auto now = clock::now();
      bucket += std::chrono::duration<double>(now - t).count();
      t = now;
    };
    for (int64_t li = 0; li < num_layers(); ++li) {
      const StackLayer& l = layers_[li];
      at::Tensor h = rms_norm(x, l.ln1, l.eps);
      lap(t_other_);
      at::Tensor qkv = q8_linear(h, l.qkv);
      lap(t_matmul_);
      if (l.qkv_bias.numel()) qkv.add_(l.qkv_bias);
      at::Tensor q = qkv_rope_store(qkv, cos, sin, l.q_norm, l.k_norm, l.qk_eps, layers_[li].k_buf,
                                    layers_[li].v_buf, loc, l.num_heads, l.num_kv_heads);
      lap(t_other_);
      at::Tensor o = at::empty_like(q);
      paged_attention(q, l.k_buf, l.v_buf, req_to_token, req_pool_indices, seq_lens, ext_lens,
                      q_start, mask_flat, mask_offsets, l.scale, o);
      lap(t_attention_);
      at::Tensor y = q8_linear(o.view({n, l.num_heads * q.size(2)}), l.o);
      lap(t_matmul_);
      x.add_(y);
      h = rms_norm(x, l.ln2, l.eps);
      lap(t_other_);
      at::Tensor gu = q8_linear(h, l.gate_up);
      lap(t_matmul_);
      at::Tensor a = silu_mul(gu);
      lap(t_other_);
      y = q8_linear(a, l.down);
      lap(t_matmul_);
      x.add_(y);
      for (size_t c = 0; c < capture.size(); ++c)
        if (capture[c] == li) {
          aux.narrow(1, static_cast<int64_t>(c) * hidden, hidden).copy_(x);
          seen[c] = true;
        }
      lap(t_other_);
    }
    for (bool c : seen) TORCH_CHECK(c, "capture names a layer the stack does not have");
    if (!n_cap) return {x};
    return {x, aux};
  }

 private:
  std::vector<StackLayer> layers_;
  bool profile_ = false;
  double t_matmul_ = 0.0, t_attention_ = 0.0, t_other_ = 0.0;
};

}  // namespace dspark
