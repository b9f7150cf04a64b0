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
// (compute_dtype.h); the loss is always fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "compute_dtype.h"
#include "gemm.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace bpp {
namespace {
constexpr int64_t kRows = 128;    // rows of h per task
constexpr int64_t kVocab = 1024;  // vocabulary entries per task
}  // namespace

at::Tensor linear_cross_entropy_cpu(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& target,
                                    int64_t ignore_index, int64_t chunk_size) {
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
  auto loss = at::zeros({N}, h.options().dtype(at::kFloat));
  if (N == 0) return loss;
  TORCH_CHECK(V > 0, "linear_cross_entropy: weight has no rows (V = 0)");
  const auto tgt = target.contiguous();
  const int64_t* t = tgt.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(t[i] == ignore_index || (t[i] >= 0 && t[i] < V), "linear_cross_entropy: target[", i, "] = ", t[i],
                " is outside [0, V=", V, ") and is not ignore_index (", ignore_index, ")");

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
  for (int64_t i = 0; i < N; ++i) {
    if (t[i] == ignore_index) continue;
    const float* pm = part_max.data() + i * chunks;
    const float* ps = part_sum.data() + i * chunks;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < chunks; ++j) m = std::max(m, pm[j]);
    double s = 0.0;
    for (int64_t j = 0; j < chunks; ++j) s += static_cast<double>(ps[j]) * std::exp(static_cast<double>(pm[j] - m));
    out[i] = static_cast<float>(static_cast<double>(m) + std::log(s) - static_cast<double>(picked[i]));
  }
  return loss;
}

}  // namespace bpp

TORCH_LIBRARY_IMPL(bpp, CPU, m) {
  m.impl("linear_cross_entropy", &bpp::linear_cross_entropy_cpu);
}
