// CPU linear cross-entropy: loss[i] = logsumexp_v(h[i] . w[v]) - h[i] . w[target[i]].
//
// The reference computes a (rows, V) logit block per chunk and runs logsumexp over it: for the
// default model that is ~100 MB of fp32 per sample, walked five times from memory (max, subtract,
// exp, sum, log), which measured as long as the LM-head GEMM itself. Here the work is cut into
// tiles of kRows rows x kVocab vocabulary entries; a tile's logits (kRows x kVocab fp32, 512 KB)
// stay in the core's cache while one GEMM writes them and their max, exp-sum and target logit are
// read off. A parallel task (at::parallel_for, single-threaded inside the region) takes one
// vocabulary chunk and every row tile, so each weight row is read and converted once.
// Each row then merges its per-chunk (max, exp-sum) pairs in vocabulary order:
//   M = max_j m_j,  loss = M + log(sum_j s_j exp(m_j - M)) - picked.
//
// Determinism and batch invariance: the tiling depends only on V, never on the thread count,
// and every row's chunks are merged in the same order, so the result is the same on every run
// and a row's loss does not depend on the rows around it (tested).
// fp16/bf16 logits are computed in fp32 on CPUs without native half-precision GEMMs
// (compute_dtype.h); the loss is always fp32. The op also returns every row's log-sum-exp (fp32,
// ignored rows included), which the backward reads instead of a second pass over the vocabulary.
//
// Backward: the same tasks recompute each tile's logits (the same GEMM calls, so the same bits),
// turn them into dlogits = (g_loss + g_lse) softmax - g_loss onehot(target) in cache, and
// accumulate dW (the task's own vocabulary rows, one writer) and dh (one float buffer per task,
// summed in task order afterwards). Never more than a tile of logits exists at a time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "compute_dtype.h"
#include "gemm.h"

#include <algorithm>
#include <cmath>
#include <array>
#include <limits>
#include <mutex>
#include <utility>
#include <vector>

namespace bpp {
namespace {
constexpr int64_t kRows = 128;    // rows of h per task
constexpr int64_t kVocab = 1024;  // vocabulary entries per task
}  // namespace

namespace {

void check_inputs(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& target, int64_t ignore_index,
                  int64_t chunk_size) {
  TORCH_CHECK(h.dim() == 2 && weight.dim() == 2 && h.size(1) == weight.size(1),
              "linear_cross_entropy: h must be (N, d) and weight (V, d), got ", h.sizes(), " and ", weight.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == h.size(0), "linear_cross_entropy: target must be (N=",
              h.size(0), ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "linear_cross_entropy: target must be int64, got ",
              target.scalar_type());
  TORCH_CHECK(h.scalar_type() == weight.scalar_type(), "linear_cross_entropy: h and weight must share a dtype, got ",
              h.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(at::isFloatingType(h.scalar_type()), "linear_cross_entropy: h must be floating point, got ",
              h.scalar_type());
  TORCH_CHECK(chunk_size > 0, "linear_cross_entropy: chunk_size must be positive, got ", chunk_size);
  TORCH_CHECK(h.device().is_cpu() && weight.device().is_cpu() && target.device().is_cpu(),
              "linear_cross_entropy: the cpp backend takes CPU tensors only");
  const int64_t N = h.size(0), V = weight.size(0);
  TORCH_CHECK(N == 0 || V > 0, "linear_cross_entropy: weight has no rows (V = 0)");
  const auto tgt = target.contiguous();
  const int64_t* t = tgt.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(t[i] == ignore_index || (t[i] >= 0 && t[i] < V), "linear_cross_entropy: target[", i, "] = ", t[i],
                " is outside [0, V=", V, ") and is not ignore_index (", ignore_index, ")");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_cpu(const at::Tensor& h, const at::Tensor& weight,
                                                            const at::Tensor& target, int64_t ignore_index,
                                                            int64_t chunk_size) {
  check_inputs(h, weight, target, ignore_index, chunk_size);
  const int64_t N = h.size(0), V = weight.size(0);
  auto loss = at::zeros({N}, h.options().dtype(at::kFloat));
  auto lse = at::zeros({N}, h.options().dtype(at::kFloat));
  if (N == 0) return {loss, lse};
  const auto tgt = target.contiguous();
  const int64_t* t = tgt.const_data_ptr<int64_t>();

  const auto compute = compute_dtype(h.scalar_type());  // see compute_dtype.h
  const auto hc = h.to(compute).contiguous();
  const auto w = weight.contiguous();
  const int64_t chunks = (V + kVocab - 1) / kVocab;
  // per (row, chunk): the chunk's max logit and sum of exp(logit - max); per row: the target's logit
  std::vector<float> part_max(N * chunks), part_sum(N * chunks);
  std::vector<float> picked(N, 0.f);

  // one task per vocabulary chunk: its weight rows are read (and converted, if need be) once and
  // stay in cache while every row tile of h passes over them
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t v0 = j * kVocab, cols = std::min(kVocab, V - v0);
      const auto wj = w.narrow(0, v0, cols).to(compute);
      for (int64_t i0 = 0; i0 < N; i0 += kRows) {
        const int64_t rows = std::min(kRows, N - i0);
        auto logits = gemm_nt(hc.narrow(0, i0, rows), wj);
        if (logits.scalar_type() != at::kFloat) logits = logits.to(at::kFloat);
        logits = logits.contiguous();
        const float* lg = logits.const_data_ptr<float>();
        for (int64_t a = 0; a < rows; ++a) {
          const int64_t ti = t[i0 + a];
          if (ti >= v0 && ti < v0 + cols) picked[i0 + a] = lg[a * cols + (ti - v0)];  // one chunk per row
        }
        const auto mx = std::get<0>(logits.max(1, /*keepdim=*/true));
        const auto se = logits.sub_(mx).exp_().sum(1);
        const float* mxp = mx.const_data_ptr<float>();
        const float* sep = se.const_data_ptr<float>();
        for (int64_t a = 0; a < rows; ++a) {
          part_max[(i0 + a) * chunks + j] = mxp[a];
          part_sum[(i0 + a) * chunks + j] = sep[a];
        }
      }
    }
  });

  float* out = loss.mutable_data_ptr<float>();
  float* out_lse = lse.mutable_data_ptr<float>();
  for (int64_t i = 0; i < N; ++i) {
    const float* pm = part_max.data() + i * chunks;
    const float* ps = part_sum.data() + i * chunks;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < chunks; ++j) m = std::max(m, pm[j]);
    double s = 0.0;
    for (int64_t j = 0; j < chunks; ++j) s += static_cast<double>(ps[j]) * std::exp(static_cast<double>(pm[j] - m));
    const double row_lse = static_cast<double>(m) + std::log(s);
    out_lse[i] = static_cast<float>(row_lse);
    if (t[i] != ignore_index) out[i] = static_cast<float>(row_lse - static_cast<double>(picked[i]));
  }
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& h, const at::Tensor& weight,
    const at::Tensor& target, const at::Tensor& lse, int64_t ignore_index, std::array<bool, 2> output_mask) {
  check_inputs(h, weight, target, ignore_index, 1);
  const int64_t N = h.size(0), V = weight.size(0), d = h.size(1);
  TORCH_CHECK(grad_loss.sizes() == target.sizes() && grad_lse.sizes() == target.sizes() &&
                  lse.sizes() == target.sizes(),
              "linear_cross_entropy_backward: grad_loss, grad_lse and lse must be (N=", N, ",)");
  const bool need_h = output_mask[0], need_w = output_mask[1];
  // a fresh (0,) tensor per unwanted output: the outputs of an op must not alias
  const auto empty = [&] { return at::empty({0}, h.options()); };
  auto dw = need_w ? at::zeros({V, d}, h.options().dtype(at::kFloat)) : empty();
  if (N == 0 || (!need_h && !need_w)) {
    return {need_h ? at::zeros_like(h) : empty(), need_w ? dw.to(weight.scalar_type()) : dw};
  }
  const auto tgt = target.contiguous();
  const int64_t* t = tgt.const_data_ptr<int64_t>();
  // per row: dlogits = coef_p * softmax - coef_t * onehot(target)
  const auto gl = grad_loss.to(at::kFloat).contiguous(), ge = grad_lse.to(at::kFloat).contiguous();
  const auto lse_f = lse.to(at::kFloat).contiguous();
  std::vector<float> coef_p(N), coef_t(N);
  for (int64_t i = 0; i < N; ++i) {
    const float g = t[i] == ignore_index ? 0.f : gl.const_data_ptr<float>()[i];
    coef_t[i] = g;
    coef_p[i] = g + ge.const_data_ptr<float>()[i];
  }
  const float* row_lse = lse_f.const_data_ptr<float>();
  const auto compute = compute_dtype(h.scalar_type());
  const auto hc = h.to(compute).contiguous();
  const auto hf = h.to(at::kFloat).contiguous();  // gradient GEMMs in fp32
  const auto w = weight.contiguous();
  const int64_t chunks = (V + kVocab - 1) / kVocab;
  std::mutex lock;
  std::vector<std::pair<int64_t, at::Tensor>> dh_parts;  // (first chunk of the task range, its dh)

  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    auto dh_part = need_h ? at::zeros({N, d}, hf.options()) : at::Tensor();
    for (int64_t j = begin; j < end; ++j) {
      const int64_t v0 = j * kVocab, cols = std::min(kVocab, V - v0);
      const auto wj = w.narrow(0, v0, cols).to(compute);
      const auto wjf = wj.to(at::kFloat);
      at::Tensor dwj = need_w ? dw.narrow(0, v0, cols) : at::Tensor();
      for (int64_t i0 = 0; i0 < N; i0 += kRows) {
        const int64_t rows = std::min(kRows, N - i0);
        auto logits = gemm_nt(hc.narrow(0, i0, rows), wj);  // the forward's call: the same bits
        if (logits.scalar_type() != at::kFloat) logits = logits.to(at::kFloat);
        logits = logits.contiguous();
        float* lg = logits.mutable_data_ptr<float>();
        for (int64_t a = 0; a < rows; ++a) {
          const int64_t i = i0 + a;
          float* row = lg + a * cols;
          const float cp = coef_p[i], m = row_lse[i];
          for (int64_t v = 0; v < cols; ++v) row[v] = cp == 0.f ? 0.f : cp * std::exp(row[v] - m);
          const int64_t ti = t[i];
          if (ti >= v0 && ti < v0 + cols) row[ti - v0] -= coef_t[i];
        }
        if (need_h) dh_part.narrow(0, i0, rows).addmm_(logits, wjf);
        if (need_w) dwj.addmm_(logits.t(), hf.narrow(0, i0, rows));
      }
    }
    if (need_h) {
      std::lock_guard<std::mutex> guard(lock);
      dh_parts.emplace_back(begin, dh_part);
    }
  });

  at::Tensor dh = empty();
  if (need_h) {
    std::sort(dh_parts.begin(), dh_parts.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    dh = dh_parts[0].second;
    for (size_t k = 1; k < dh_parts.size(); ++k) dh.add_(dh_parts[k].second);
    dh = dh.to(h.scalar_type());
  }
  return {dh, need_w ? dw.to(weight.scalar_type()) : dw};
}

}  // namespace bpp

TORCH_LIBRARY_IMPL(bpp, CPU, m) {
  m.impl("linear_cross_entropy", &bpp::linear_cross_entropy_cpu);
  m.impl("linear_cross_entropy_backward", &bpp::linear_cross_entropy_backward_cpu);
}
