// The gated activations of masked_swiglu as fused fp32 passes over rows: the forward's
// act(G) * U * a, and the backward's [dG | dU], H * a and sum(dH * H) in one pass, where chained
// ATen kernels take five. SiLU is g * sigmoid(g); tanh-GELU (torch's gelu(approximate="tanh")) is
// 0.5 g (1 + tanh(z)) = g * sigmoid(2z), z = sqrt(2/pi) (g + 0.044715 g^3), so both are g * p with
// p a sigmoid. The loops are compiled three times (AVX-512, AVX2 + FMA, the build's baseline) and
// the CPU picks one at run time: the extension itself is built for x86-64-v2 (SSE4.2). The
// exponential is a polynomial the compiler vectorises (std::exp stays a scalar call), relative
// error ~1e-7. Every element's value depends only on its own inputs (and, for the scale gradient,
// its column, summed in row order by one thread), never on the thread count or on S.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstdlib>
#include <string_view>

namespace bpp {

enum class GluActivation { kSilu, kGeluTanh };

// Elements per parallel task in the fused passes: one costs well under a nanosecond, so parallel.h's
// 32k-element rule would open a region for ~10 us of work, while waking the pool costs milliseconds
// on a busy machine (two threads of a loaded two-core host measured the op ~1.4x slower with it).
constexpr int64_t kFusedPassWork = int64_t{1} << 20;

// Items per task when each item is work_per_item elements of a fused pass (at least at_least).
inline int64_t fused_grain(int64_t work_per_item, int64_t at_least = 1) {
  return std::max(at_least, kFusedPassWork / std::max<int64_t>(work_per_item, 1));
}

namespace glu_detail {

// e^x, Cephes' expf polynomial; exponents beyond the float range are clamped (2^-126 and 2^127
// stand for 0 and inf, which is all the sigmoids below need; x86 converts an out-of-range, infinite
// or NaN n to INT_MIN, clamped too, and a NaN x gives NaN through r).
[[gnu::always_inline]] inline float exp_approx(float x) {
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // x / ln 2, rounded
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  int32_t i = static_cast<int32_t>(n);
  i = i < -126 ? -126 : (i > 127 ? 127 : i);
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return (p * r * r + r + 1.f) * std::bit_cast<float>((i + 127) << 23);
}

constexpr float kTwoK = 1.5957691216057308f;  // 2 sqrt(2/pi)
constexpr float kGeluC = 0.044715f;

// act(g) = g * p; p is returned through p_out, and dy (the slope of p's argument) through dy_out.
template <GluActivation kAct>
[[gnu::always_inline]] inline float act_of(float g, float& p_out, float& dy_out) {
  if constexpr (kAct == GluActivation::kSilu) {
    p_out = 1.f / (1.f + exp_approx(-g));
    dy_out = 1.f;
  } else {
    p_out = 1.f / (1.f + exp_approx(-kTwoK * (g + kGeluC * g * g * g)));
    dy_out = kTwoK * (1.f + 3.f * kGeluC * g * g);
  }
  return g * p_out;
}

// act (rows [r0, r1) of N, c contiguous) = act(G) * U * a, from gu = [G | U] (row stride 2c).
// kScale: a is read (else 1); a compile-time choice, so the inner loop has no branch to vectorise.
template <GluActivation kAct, bool kScale>
[[gnu::always_inline]] inline void forward_rows(const float* __restrict gu, int64_t c, const float* __restrict a,
                                                float* __restrict act, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* g = gu + r * 2 * c;
    const float* u = g + c;
    float* out = act + r * c;
    for (int64_t j = 0; j < c; ++j) {
      float p, dy;
      const float h = act_of<kAct>(g[j], p, dy) * u[j];
      if constexpr (kScale) {
        out[j] = h * a[j];
      } else {
        out[j] = h;
      }
    }
  }
}

// Columns [j0, j1) of the backward between the GEMMs, all N rows, in row order: from G, U (row
// stride ld) and dh = dY W_down^T (N, n contiguous), dgu (N, 2n) = [dG | dU], h (N, n) = H * a, and
// dscale[j] = sum over rows of dH * H (kDscale). dA = dH * a (kScale; else dH).
template <GluActivation kAct, bool kScale, bool kDscale>
[[gnu::always_inline]] inline void backward_cols(const float* __restrict g, const float* __restrict u, int64_t ld,
                                                 const float* __restrict dh, int64_t N, int64_t n,
                                                 const float* __restrict a, float* __restrict dgu,
                                                 float* __restrict h, float* __restrict dscale, int64_t j0,
                                                 int64_t j1) {
  for (int64_t r = 0; r < N; ++r) {
    const float* gr = g + r * ld;
    const float* ur = u + r * ld;
    const float* dhr = dh + r * n;
    float* dgr = dgu + r * 2 * n;
    float* hr = h + r * n;
    for (int64_t j = j0; j < j1; ++j) {
      const float gv = gr[j], uv = ur[j];
      float p, dy;
      const float act = act_of<kAct>(gv, p, dy), hv = act * uv;
      float d = dhr[j];
      if constexpr (kDscale) dscale[j] += d * hv;
      if constexpr (kScale) {
        d *= a[j];
        hr[j] = hv * a[j];
      } else {
        hr[j] = hv;
      }
      dgr[j] = d * uv * (p + gv * p * (1.f - p) * dy);
      dgr[n + j] = d * act;
    }
  }
}

// One entry point per instruction set, every activation and optional input compiled in.
template <GluActivation kAct>
[[gnu::always_inline]] inline void forward_rows_any(const float* gu, int64_t c, const float* a, float* act, int64_t r0,
                                                    int64_t r1) {
  if (a != nullptr) {
    forward_rows<kAct, true>(gu, c, a, act, r0, r1);
  } else {
    forward_rows<kAct, false>(gu, c, a, act, r0, r1);
  }
}

template <GluActivation kAct>
[[gnu::always_inline]] inline void backward_cols_any(const float* g, const float* u, int64_t ld, const float* dh,
                                                     int64_t N, int64_t n, const float* a, float* dgu, float* h,
                                                     float* dscale, int64_t j0, int64_t j1) {
  if (a != nullptr && dscale != nullptr) {
    backward_cols<kAct, true, true>(g, u, ld, dh, N, n, a, dgu, h, dscale, j0, j1);
  } else if (a != nullptr) {
    backward_cols<kAct, true, false>(g, u, ld, dh, N, n, a, dgu, h, dscale, j0, j1);
  } else if (dscale != nullptr) {
    backward_cols<kAct, false, true>(g, u, ld, dh, N, n, a, dgu, h, dscale, j0, j1);
  } else {
    backward_cols<kAct, false, false>(g, u, ld, dh, N, n, a, dgu, h, dscale, j0, j1);
  }
}

#define BPP_GLU_VARIANTS(ATTR, SUFFIX)                                                                              \
  ATTR inline void forward_rows_##SUFFIX(GluActivation k, const float* gu, int64_t c, const float* a, float* act,   \
                                         int64_t r0, int64_t r1) {                                                  \
    if (k == GluActivation::kSilu) {                                                                                \
      forward_rows_any<GluActivation::kSilu>(gu, c, a, act, r0, r1);                                                \
    } else {                                                                                                        \
      forward_rows_any<GluActivation::kGeluTanh>(gu, c, a, act, r0, r1);                                            \
    }                                                                                                               \
  }                                                                                                                 \
  ATTR inline void backward_cols_##SUFFIX(GluActivation k, const float* g, const float* u, int64_t ld,              \
                                          const float* dh, int64_t N, int64_t n, const float* a, float* dgu,        \
                                          float* h, float* dscale, int64_t j0, int64_t j1) {                        \
    if (k == GluActivation::kSilu) {                                                                                \
      backward_cols_any<GluActivation::kSilu>(g, u, ld, dh, N, n, a, dgu, h, dscale, j0, j1);                       \
    } else {                                                                                                        \
      backward_cols_any<GluActivation::kGeluTanh>(g, u, ld, dh, N, n, a, dgu, h, dscale, j0, j1);                   \
    }                                                                                                               \
  }

#if defined(__x86_64__) && defined(__GNUC__)
BPP_GLU_VARIANTS(__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma"))), avx512)
BPP_GLU_VARIANTS(__attribute__((target("avx2,fma"))), avx2)
#endif
BPP_GLU_VARIANTS(, baseline)
#undef BPP_GLU_VARIANTS

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The variant this CPU runs: the widest it has, or a narrower one named by BPP_GLU_ISA=baseline|
// avx2|avx512 (read once per process; lets the tests run the variants an AVX-512 CPU skips).
inline Isa isa() {
  static const Isa chosen = [] {
    Isa best = Isa::kBaseline;
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")) {
      best = Isa::kAvx512;
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      best = Isa::kAvx2;
    }
#endif
    const char* env = std::getenv("BPP_GLU_ISA");
    if (env == nullptr || *env == '\0') return best;
    const std::string_view want(env);
    TORCH_CHECK(want == "baseline" || want == "avx2" || want == "avx512", "BPP_GLU_ISA=", want,
                " is not one of baseline, avx2, avx512");
    const Isa asked = want == "baseline" ? Isa::kBaseline : (want == "avx2" ? Isa::kAvx2 : Isa::kAvx512);
    return std::min(asked, best);
  }();
  return chosen;
}

}  // namespace glu_detail

// act (N, c) contiguous = act(G) * U * a (a: c scales, or null) from gu (N, 2c) = [G | U] contiguous.
inline void glu_forward(GluActivation k, const float* gu, int64_t N, int64_t c, const float* a, float* act) {
  using namespace glu_detail;
  at::parallel_for(0, N, fused_grain(c), [&](int64_t r0, int64_t r1) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (isa() == Isa::kAvx512) return forward_rows_avx512(k, gu, c, a, act, r0, r1);
    if (isa() == Isa::kAvx2) return forward_rows_avx2(k, gu, c, a, act, r0, r1);
#endif
    forward_rows_baseline(k, gu, c, a, act, r0, r1);
  });
}

// The backward between the GEMMs for N rows of n channels: from G, U (row stride ld) and dh (N, n)
// contiguous, dgu (N, 2n) = [dG | dU] and h (N, n) = H * a, both contiguous; dscale (n floats, or
// null) receives sum over rows of dH * H. a: n scales, or null. Columns are split across threads,
// so every dscale entry is summed by one thread in row order.
inline void glu_backward(GluActivation k, const float* g, const float* u, int64_t ld, const float* dh, int64_t N,
                         int64_t n, const float* a, float* dgu, float* h, float* dscale) {
  using namespace glu_detail;
  at::parallel_for(0, n, fused_grain(N, 16), [&](int64_t j0, int64_t j1) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (isa() == Isa::kAvx512) return backward_cols_avx512(k, g, u, ld, dh, N, n, a, dgu, h, dscale, j0, j1);
    if (isa() == Isa::kAvx2) return backward_cols_avx2(k, g, u, ld, dh, N, n, a, dgu, h, dscale, j0, j1);
#endif
    backward_cols_baseline(k, g, u, ld, dh, N, n, a, dgu, h, dscale, j0, j1);
  });
}

}  // namespace bpp
