// y = x @ w.T for the CPU ops: through oneDNN on AVX512 CPUs, else ATen's mm (MKL).
//
// Why: ATen's fp32 mm goes to MKL; oneDNN's JIT kernels measured 9-16% faster at the ops'
// shapes on the AVX512 EPYC of bench/RESULTS.md (weights not pre-packed, as the gathered
// weights differ per sample), likely because MKL picks its kernels by CPU vendor as well as
// instruction set and oneDNN by instruction set alone. oneDNN is reached through the op torch
// registers for it (mkldnn::_linear_pointwise); no oneDNN header is needed, and a torch
// without it falls back to mm.
// BPP_CPU_GEMM=onednn|aten|auto chooses (see use_onednn; bench/cpu_ops.py times both).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "compute_dtype.h"

#include <cstdlib>
#include <cstring>
#include <optional>
#include <string_view>

namespace bpp {

using OnednnLinear = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                std::string_view, c10::List<std::optional<at::Scalar>>,
                                std::optional<std::string_view>);

inline const std::optional<c10::TypedOperatorHandle<OnednnLinear>>& onednn_linear_handle() {
  static const std::optional<c10::TypedOperatorHandle<OnednnLinear>> op =
      []() -> std::optional<c10::TypedOperatorHandle<OnednnLinear>> {
    if (!at::hasMKLDNN()) return std::nullopt;
    const auto handle = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
    if (!handle || !handle->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
    try {
      return handle->typed<OnednnLinear>();
    } catch (const c10::Error&) {  // another torch with another signature: use mm
      return std::nullopt;
    }
  }();
  return op;
}

// The GEMM library, from BPP_CPU_GEMM (read per call, so a benchmark can interleave them; all
// samples of a call see the same value, so batch invariance holds): "onednn", "aten" (mm), or
// "auto" / unset: oneDNN on CPUs with AVX512, where it was measured faster, and mm elsewhere
// (on the AVX2 EPYC of bench/RESULTS.md the C++ ops were measured with mm only).
inline bool use_onednn() {
  if (!at::globalContext().userEnabledMkldnn()) return false;  // torch.backends.mkldnn.enabled = False
  const char* env = std::getenv("BPP_CPU_GEMM");
  if (env != nullptr && std::strcmp(env, "aten") == 0) return false;
  if (env != nullptr && std::strcmp(env, "onednn") == 0) return onednn_linear_handle().has_value();
  TORCH_CHECK(env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0, "BPP_CPU_GEMM=", env,
              " is not one of onednn, aten, auto");
  static const bool avx512 = cpu_has("avx512_f");
  return avx512 && onednn_linear_handle().has_value();
}

inline const c10::TypedOperatorHandle<OnednnLinear>* onednn_linear_op() {
  return use_onednn() ? &*onednn_linear_handle() : nullptr;
}

// x (n, k), w (m, k) (any strides: a transposed view is read as such); returns (n, m) contiguous.
inline at::Tensor gemm_nt(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias = {}) {
  const auto* op = onednn_linear_op();
  const auto t = x.scalar_type();
  if (op && (t == at::kFloat || t == at::kBFloat16) && x.size(0) > 0) {
    return op->call(x.stride(1) == 1 ? x : x.contiguous(), w, bias, "none", c10::List<std::optional<at::Scalar>>(),
                    std::nullopt);
  }
  return bias ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
}

// dst (n, m), contiguous, = x @ w.T, cast to dst's dtype: mm writes in place when the dtypes
// agree; oneDNN (or a compute dtype wider than dst's) goes through one temporary.
inline void gemm_nt_into(at::Tensor& dst, const at::Tensor& x, const at::Tensor& w) {
  if (onednn_linear_op() == nullptr && dst.scalar_type() == x.scalar_type()) {
    at::mm_out(dst, x, w.t());
  } else {
    dst.copy_(gemm_nt(x, w));
  }
}

}  // namespace bpp
