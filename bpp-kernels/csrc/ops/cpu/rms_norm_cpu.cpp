// CPU RMSNorm over the last dim, and the same fused with the residual add before it, computed as
// bpp_kernels/reference.py does, every rounding included: h = x.to(residual's dtype) + residual
// (add_rms_norm; h is x for rms_norm), rstd = 1 / sqrt(mean(h^2) + eps) in fp32,
// normed = (h * rstd) rounded to h's dtype, y = weight * normed in the dtype weight and h promote
// to (fp32 unless they share a dtype), then converted to out_dtype. One parallel pass over the
// rows: each row is swept once to write h and sum its squares, and once more, while it is in
// cache, to write y; fp16 and bf16 are converted on vector lanes where they are read or written
// (no widened copies; the same bits as ATen's conversions). The loops (rms_norm_rows.h) are
// compiled twice, for the extension's baseline ISA and for AVX2 + F16C, and the CPU picks; both
// give the same bits (NaN payloads aside). A row's result depends only on that row (the same bits alone or in any
// batch).
// Backward: each row's rstd is recomputed from the saved h (nothing else is saved); with
// xhat = h * rstd and dn = dy * weight,
//   dh = rstd * (dn - xhat * mean(dn * xhat)) (+ the gradient that reached h directly),
// in fp32, rounded once to h's dtype; the rounding of normed is treated as the identity there, as
// the Triton kernels do. The weight gradient (the sum over rows of dy * normed) is accumulated per
// fixed block of rows and the blocks' partial sums added in block order (row_sums.h): the same
// bits whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include "parallel.h"
#include "row_sums.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // GCC's target pragma
#include <immintrin.h>
#define BPP_RMS_HAS_AVX2_COPY 1
#else
#define BPP_RMS_HAS_AVX2_COPY 0
#endif

#define BPP_RMS_NS baseline
#define BPP_RMS_AVX2 0
#include "rms_norm_rows.h"
#undef BPP_RMS_NS
#undef BPP_RMS_AVX2

#if BPP_RMS_HAS_AVX2_COPY
// no "fma": the compiler would fuse multiplies and adds there and not in the baseline copy
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define BPP_RMS_NS avx2
#define BPP_RMS_AVX2 1
#include "rms_norm_rows.h"
#undef BPP_RMS_NS
#undef BPP_RMS_AVX2
#pragma GCC pop_options
#endif

namespace bpp {
namespace {

// The AVX2 + F16C copy where the CPU has them and ATen's own kernels may use AVX2
// (ATEN_CPU_CAPABILITY=default turns both off); the same bits either way.
bool use_avx2() {
#if BPP_RMS_HAS_AVX2_COPY
  static const bool yes = at::get_cpu_capability() != "DEFAULT" && __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("f16c");
  return yes;
#else
  return false;
#endif
}

bool computable(at::ScalarType type) {
  return type == at::kFloat || type == at::kHalf || type == at::kBFloat16;
}

// x (..., d), weight (d,), residual (x's shape), all CPU, dtypes the kernels compute
int64_t check_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor* residual) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must be (..., d), got ", x.sizes());
  const int64_t d = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d, op, ": weight must be (", d, ",), got ", weight.sizes());
  TORCH_CHECK(residual == nullptr || residual->sizes() == x.sizes(), op, ": x ", x.sizes(), " and residual ",
              residual->sizes(), " differ");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && (residual == nullptr || residual->device().is_cpu()),
              op, ": the cpp backend takes CPU tensors only");
  TORCH_CHECK(computable(x.scalar_type()) && computable(weight.scalar_type()) &&
                  (residual == nullptr || computable(residual->scalar_type())),
              op, ": the cpp backend computes float32, float16 and bfloat16 (float64 runs on the reference)");
  return d;
}

// y's dtype: out_dtype, else what weight * normed promotes to
at::ScalarType output_type(const char* op, at::ScalarType h_type, const at::Tensor& weight,
                           std::optional<at::ScalarType> out_dtype) {
  const auto type = out_dtype.value_or(at::promote_types(weight.scalar_type(), h_type));
  TORCH_CHECK(computable(type), op, ": out_dtype must be float32, float16 or bfloat16 on the cpp backend, got ",
              type);
  return type;
}

int64_t rows_of(const at::Tensor& t, int64_t d) { return d > 0 ? t.numel() / d : 0; }

void forward(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& w, at::Tensor* h, at::Tensor& y,
             int64_t rows, int64_t d, double eps, bool product_in_h) {
#if BPP_RMS_HAS_AVX2_COPY
  if (use_avx2()) return avx2::forward(x, residual, w, h, y, rows, d, static_cast<float>(eps), product_in_h);
#endif
  baseline::forward(x, residual, w, h, y, rows, d, static_cast<float>(eps), product_in_h);
}

}  // namespace

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps,
                        std::optional<at::ScalarType> out_dtype) {
  const int64_t d = check_inputs("rms_norm", x, weight, nullptr);
  const auto h_type = x.scalar_type();
  const auto y_type = output_type("rms_norm", h_type, weight, out_dtype);
  const auto xc = x.contiguous();
  const auto w = weight.to(at::kFloat).contiguous();
  auto y = at::empty(x.sizes(), x.options().dtype(y_type));
  const int64_t rows = rows_of(x, d);
  if (rows == 0) return y;
  forward(xc, nullptr, w, nullptr, y, rows, d, eps, weight.scalar_type() == h_type);
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& weight, double eps,
                                                    std::optional<at::ScalarType> out_dtype) {
  const int64_t d = check_inputs("add_rms_norm", x, weight, &residual);
  const auto h_type = residual.scalar_type();
  const auto y_type = output_type("add_rms_norm", h_type, weight, out_dtype);
  const auto xc = x.contiguous(), rc = residual.contiguous();
  const auto w = weight.to(at::kFloat).contiguous();
  auto y = at::empty(x.sizes(), x.options().dtype(y_type));
  auto h = at::empty(x.sizes(), x.options().dtype(h_type));
  const int64_t rows = rows_of(x, d);
  if (rows == 0) return {y, h};
  forward(xc, &rc, w, &h, y, rows, d, eps, weight.scalar_type() == h_type);
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_out,
                                                         const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
                                                         const at::Tensor& weight, double eps, bool need_weight) {
  const int64_t d = check_inputs("rms_norm_backward", h, weight, nullptr);
  TORCH_CHECK(grad_out.sizes() == h.sizes(), "rms_norm_backward: grad_out ", grad_out.sizes(), " != h ", h.sizes());
  TORCH_CHECK(!grad_h || grad_h->sizes() == h.sizes(), "rms_norm_backward: grad_h ", grad_h->sizes(), " != h ",
              h.sizes());
  const auto h_type = h.scalar_type();
  const auto hc = h.contiguous();
  const auto gy = computable(grad_out.scalar_type()) ? grad_out.contiguous() : grad_out.to(at::kFloat).contiguous();
  std::optional<at::Tensor> gh;
  if (grad_h) gh = grad_h->to(h_type).contiguous();
  const auto w = weight.to(at::kFloat).contiguous();
  const int64_t rows = rows_of(h, d);
  auto dh = at::empty(h.sizes(), h.options());
  auto dw_part = at::zeros({need_weight ? row_blocks(rows) : 0, d}, h.options().dtype(at::kFloat));
  float* dw_rows = need_weight ? dw_part.mutable_data_ptr<float>() : nullptr;
  const at::Tensor* ghp = gh ? &*gh : nullptr;
  if (rows > 0) {
#if BPP_RMS_HAS_AVX2_COPY
    if (use_avx2()) {
      avx2::backward(hc, w, gy, ghp, dh, dw_rows, rows, d, static_cast<float>(eps));
    } else {
      baseline::backward(hc, w, gy, ghp, dh, dw_rows, rows, d, static_cast<float>(eps));
    }
#else
    baseline::backward(hc, w, gy, ghp, dh, dw_rows, rows, d, static_cast<float>(eps));
#endif
  }
  // a fresh (0,) tensor when unwanted: the outputs of an op must not alias
  auto dw = need_weight ? sum_blocks<float>(dw_part).to(weight.scalar_type()) : at::empty({0}, weight.options());
  return {dh, dw};
}

}  // namespace bpp

TORCH_LIBRARY_IMPL(bpp, CPU, m) {
  m.impl("rms_norm", &bpp::rms_norm_cpu);
  m.impl("add_rms_norm", &bpp::add_rms_norm_cpu);
  m.impl("rms_norm_backward", &bpp::rms_norm_backward_cpu);
}
