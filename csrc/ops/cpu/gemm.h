// y = x @ w.T for the CPU ops, through oneDNN when this torch has it, else ATen's mm (MKL).
//
// Why: ATen's fp32 mm goes to MKL; oneDNN's JIT kernels measured 9-16% faster at the ops'
// shapes on the AVX512 EPYC of bench/RESULTS.md (weights not pre-packed, as the gathered
// weights differ per sample), likely because MKL picks its kernels by CPU vendor as well as
// instruction set and oneDNN by instruction set alone. oneDNN is reached through the op torch
// registers for it (mkldnn::_linear_pointwise); no oneDNN header is needed, and a torch
// without it falls back to mm.
// BPP_CPU_GEMM=aten forces mm (bench/cpu_ops.py times both side by side).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

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

// oneDNN unless BPP_CPU_GEMM=aten (read per call, so a benchmark can interleave both; a call's
// samples all see the same value, so batch invariance holds).
inline const c10::TypedOperatorHandle<OnednnLinear>* onednn_linear_op() {
  const char* env = std::getenv("BPP_CPU_GEMM");
  if (env != nullptr && std::strcmp(env, "aten") == 0) return nullptr;
  const auto& handle = onednn_linear_handle();
  return handle ? &*handle : nullptr;
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

}  // namespace bpp
