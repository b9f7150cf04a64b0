// The dtype the CPU ops compute in. fp32 runs as fp32. fp16 and bf16 GEMMs are only fast on CPUs
// with native instructions for them (AVX512-FP16/AMX-FP16, AVX512-BF16/AMX-BF16); elsewhere
// oneDNN emulates them, measured 19x (bf16) and 23x (fp16) slower than fp32 on an AVX2 EPYC for
// the masked MLP of bench/cpu_ops.py. Without the instructions the half-precision inputs are
// computed in fp32 and rounded once at the end: more accurate than the reference, not less.
// The choice depends only on the machine, never on the batch, so batch invariance holds.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/Utils.h>

namespace bpp {

inline bool cpu_has(const char* capability) {
  const auto caps = at::cpu::get_cpu_capabilities();
  const auto it = caps.find(capability);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

inline at::ScalarType compute_dtype(at::ScalarType store) {
  static const bool native_fp16 = cpu_has("avx512_fp16") || cpu_has("amx_fp16");
  static const bool native_bf16 = cpu_has("avx512_bf16") || cpu_has("amx_bf16");
  if (store == at::kHalf && !native_fp16) return at::kFloat;
  if (store == at::kBFloat16 && !native_bf16) return at::kFloat;
  return store;
}

}  // namespace bpp
