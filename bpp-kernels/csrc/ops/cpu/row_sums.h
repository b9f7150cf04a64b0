// Fixed-order sums for the row-wise CPU ops (layer_norm, rms_norm), so results do not depend on
// the thread count:
// - row_sum: a sum over one row in kLanes independent partial sums (which the compiler may
//   vectorise without -ffast-math), combined in a fixed order;
// - weight gradients: each task sums a fixed block of kRowsPerBlock rows into its own row of a
//   (blocks, d) buffer, and sum_blocks adds the blocks in block order.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace bpp {

constexpr int64_t kLanes = 8;
constexpr int64_t kRowsPerBlock = 32;  // backward: rows whose weight gradients one task sums

// sum over e < d of f(e), in a fixed order
template <typename acc_t, typename F>
inline acc_t row_sum(int64_t d, F f) {
  acc_t part[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= d; e += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) part[k] += f(e + k);
  acc_t total = 0;
  for (; e < d; ++e) total += f(e);
  for (int64_t k = 0; k < kLanes; ++k) total += part[k];
  return total;
}

inline int64_t row_blocks(int64_t rows) { return (rows + kRowsPerBlock - 1) / kRowsPerBlock; }

// (blocks, d) partial sums -> (d,), the blocks added in order (deterministic)
template <typename acc_t>
at::Tensor sum_blocks(const at::Tensor& part) {
  const int64_t blocks = part.size(0), d = part.size(1);
  auto out = at::zeros({d}, part.options());
  acc_t* o = out.mutable_data_ptr<acc_t>();
  const acc_t* p = part.const_data_ptr<acc_t>();
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t e = 0; e < d; ++e) o[e] += p[blk * d + e];
  return out;
}

}  // namespace bpp
