// CPU LayerNorm over the last dim, as torch.nn.functional.layer_norm computes it: per row the
// mean and the biased variance in fp32 (float64 for float64 inputs; two passes, (x - mean)^2 in
// the second, no cancellation), y = (x - mean) * rstd * weight + bias in fp32, one rounding to
// x's dtype. Rows are split across threads, each row read three times while it is in cache; a
// row's result depends only on that row (the same bits alone or in any batch).
// Backward: each row's mean and rstd are recomputed from the saved x (nothing else is saved);
// with xhat = (x - mean) * rstd and dn = dy * weight,
//   dx = rstd * (dn - mean(dn) - xhat * mean(dn * xhat)),
// and the weight and bias gradients (sums over rows of dy * xhat and dy) are accumulated per fixed
// block of rows and the blocks' partial sums added in block order: the same bits whatever the
// thread count.
// Sums over a row and over the blocks are row_sums.h's, in a fixed order. fp16 and bf16 inputs
// are widened to fp32 once by ATen's copy (its runtime-dispatched vector kernels; converting
// element by element here, without F16C in the baseline ISA this extension is built for, measured
// 4x slower for fp16 at bench/cpu_ops.py's shape) and the result is rounded once at the end: the
// same bits either way.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "parallel.h"
#include "row_sums.h"

#include <array>
#include <cmath>
#include <optional>

namespace bpp {
namespace {

template <typename scalar_t, typename acc_t>
inline std::pair<acc_t, acc_t> row_stats(const scalar_t* x, int64_t d, double eps) {
  const acc_t mean = row_sum<acc_t>(d, [&](int64_t e) { return static_cast<acc_t>(x[e]); }) / d;
  const acc_t var = row_sum<acc_t>(d, [&](int64_t e) {
                      const acc_t v = static_cast<acc_t>(x[e]) - mean;
                      return v * v;
                    }) / d;
  return {mean, acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps))};
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, "layer_norm: x must be (..., d), got ", x.sizes());
  const int64_t d = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d, "layer_norm: weight must be (", d, ",), got ",
              weight.sizes());
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == d), "layer_norm: bias must be (", d, ",), got ",
              bias->sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && (!bias || bias->scalar_type() == x.scalar_type()),
              "layer_norm: x, weight and bias must share a dtype");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && (!bias || bias->device().is_cpu()),
              "layer_norm: the cpp backend takes CPU tensors only");
}

template <typename scalar_t>
void forward_rows(const scalar_t* x, const scalar_t* w, const scalar_t* b, scalar_t* y, int64_t rows, int64_t d,
                  double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, grain_for(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * d;
      scalar_t* yr = y + r * d;
      const auto [mean, rstd] = row_stats<scalar_t, acc_t>(xr, d, eps);
      for (int64_t e = 0; e < d; ++e) {
        const acc_t v = (static_cast<acc_t>(xr[e]) - mean) * rstd * static_cast<acc_t>(w[e]);
        yr[e] = static_cast<scalar_t>(b != nullptr ? v + static_cast<acc_t>(b[e]) : v);
      }
    }
  });
}

// dx (or null) for every row; dw_part, db_part (or null): (blocks, d) partial sums, one row per block
template <typename scalar_t>
void backward_rows(const scalar_t* x, const scalar_t* w, const scalar_t* dy, scalar_t* dx,
                   at::opmath_type<scalar_t>* dw_part, at::opmath_type<scalar_t>* db_part, int64_t rows, int64_t d,
                   double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t blocks = row_blocks(rows);
  at::parallel_for(0, blocks, grain_for(kRowsPerBlock * d), [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      acc_t* dw = dw_part != nullptr ? dw_part + blk * d : nullptr;
      acc_t* db = db_part != nullptr ? db_part + blk * d : nullptr;
      const int64_t last = std::min(rows, (blk + 1) * kRowsPerBlock);
      for (int64_t r = blk * kRowsPerBlock; r < last; ++r) {
        const scalar_t* xr = x + r * d;
        const scalar_t* gr = dy + r * d;
        const auto [mean, rstd] = row_stats<scalar_t, acc_t>(xr, d, eps);
        if (dw != nullptr || db != nullptr) {
          for (int64_t e = 0; e < d; ++e) {
            const acc_t g = static_cast<acc_t>(gr[e]);
            if (dw != nullptr) dw[e] += g * (static_cast<acc_t>(xr[e]) - mean) * rstd;
            if (db != nullptr) db[e] += g;
          }
        }
        if (dx == nullptr) continue;
        const acc_t mean_dn =
            row_sum<acc_t>(d, [&](int64_t e) { return static_cast<acc_t>(gr[e]) * static_cast<acc_t>(w[e]); }) / d;
        const acc_t mean_dn_xhat = row_sum<acc_t>(d, [&](int64_t e) {
                                     return static_cast<acc_t>(gr[e]) * static_cast<acc_t>(w[e]) *
                                            (static_cast<acc_t>(xr[e]) - mean) * rstd;
                                   }) / d;
        scalar_t* dxr = dx + r * d;
        for (int64_t e = 0; e < d; ++e) {
          const acc_t xhat = (static_cast<acc_t>(xr[e]) - mean) * rstd;
          const acc_t dn = static_cast<acc_t>(gr[e]) * static_cast<acc_t>(w[e]);
          dxr[e] = static_cast<scalar_t>(rstd * (dn - mean_dn - xhat * mean_dn_xhat));
        }
      }
    }
  });
}

// fp16 / bf16 -> fp32 (see the top of the file); other dtypes as they are
at::Tensor widened(const at::Tensor& t) {
  const auto type = t.scalar_type();
  return (type == at::kHalf || type == at::kBFloat16) ? t.to(at::kFloat) : t;
}

std::optional<at::Tensor> widened(const std::optional<at::Tensor>& t) {
  if (!t) return std::nullopt;
  return widened(*t);
}

}  // namespace

at::Tensor layer_norm_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          double eps) {
  check_inputs(x, weight, bias);
  if (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16)
    return layer_norm_cpu(widened(x), widened(weight), widened(bias), eps).to(x.scalar_type());
  const auto xc = x.contiguous(), w = weight.contiguous();
  std::optional<at::Tensor> b;
  if (bias) b = bias->contiguous();
  auto y = at::empty_like(xc);
  const int64_t d = x.size(-1), rows = d > 0 ? x.numel() / d : 0;
  if (rows == 0) return y.view(x.sizes());
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "layer_norm", [&] {
    forward_rows<scalar_t>(xc.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                           b ? b->const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(), rows, d, eps);
  });
  return y.view(x.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                                       const at::Tensor& weight,
                                                                       const std::optional<at::Tensor>& bias,
                                                                       double eps, std::array<bool, 3> output_mask) {
  check_inputs(x, weight, bias);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "layer_norm_backward: grad_out ", grad_out.sizes(), " != x ", x.sizes());
  if (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) {
    auto [dx, dw, db] = layer_norm_backward_cpu(grad_out.to(at::kFloat), widened(x), widened(weight), widened(bias),
                                                eps, output_mask);
    return {output_mask[0] ? dx.to(x.scalar_type()) : dx, output_mask[1] ? dw.to(weight.scalar_type()) : dw,
            output_mask[2] && bias ? db.to(bias->scalar_type()) : db};
  }
  const auto xc = x.contiguous(), w = weight.contiguous();
  const auto gy = grad_out.to(x.scalar_type()).contiguous();
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2] && bias.has_value();
  const int64_t d = x.size(-1), rows = d > 0 ? x.numel() / d : 0;
  const int64_t blocks = row_blocks(rows);
  // a fresh (0,) tensor per unwanted output: the outputs of an op must not alias
  const auto empty = [&] { return at::empty({0}, xc.options()); };
  auto dx = need_x ? at::empty_like(xc) : empty();
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto dw_part = need_w ? at::zeros({blocks, d}, xc.options().dtype(acc)) : empty();
  auto db_part = need_b ? at::zeros({blocks, d}, xc.options().dtype(acc)) : empty();
  at::Tensor dw = empty(), db = empty();
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "layer_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (rows > 0 && (need_x || need_w || need_b))
      backward_rows<scalar_t>(xc.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                              gy.const_data_ptr<scalar_t>(), need_x ? dx.mutable_data_ptr<scalar_t>() : nullptr,
                              need_w ? dw_part.mutable_data_ptr<acc_t>() : nullptr,
                              need_b ? db_part.mutable_data_ptr<acc_t>() : nullptr, rows, d, eps);
    if (need_w) dw = sum_blocks<acc_t>(dw_part).to(weight.scalar_type());
    if (need_b) db = sum_blocks<acc_t>(db_part).to(bias->scalar_type());
  });
  return {need_x ? dx.view(x.sizes()) : dx, dw, db};
}

}  // namespace bpp

TORCH_LIBRARY_IMPL(bpp, CPU, m) {
  m.impl("layer_norm", &bpp::layer_norm_cpu);
  m.impl("layer_norm_backward", &bpp::layer_norm_backward_cpu);
}
