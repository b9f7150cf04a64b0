// CPU masked gated MLP (SwiGLU, or GeGLU with activation "gelu_tanh"). Per sample s with c kept
// channels:
//   1. copy the kept rows of the interleaved gate/up weight into one (2c, d) block, gate rows
//      first, then up rows (plain memcpy per row: ATen's index_select copies slice by slice
//      and measured ~20x slower than the GEMM input it produces needs);
//   2. one GEMM gives gate and up side by side, (N, 2c) = [G | U];
//   3. the activation (SiLU or tanh-GELU) in place on G, then G *= U (and *= unit_scale):
//      vectorised ATen passes over contiguous rows (the interleaved layout would make them
//      strided); G is then the (N, c) activation, read by the next GEMM through its row stride
//      2c, no copy;
//   4. one GEMM against the gathered rows of W_down^T, written straight into out[s].
// Backward, per sample: the same gathers, [G | U] recomputed (one GEMM) and dH = dY W_down^T
// (one GEMM); one pass turns them into [dG | dU] in place; then dX = [dG | dU] W (one GEMM) and
// the kept rows' weight gradients dW = [dG | dU]^T X, dW_down = H^T dY (two GEMMs), added into
// float accumulators row by row. Pruned rows are never read and keep a zero gradient.
// fp16/bf16 are computed in fp32 on CPUs without native half-precision GEMMs (compute_dtype.h).
// Batch invariance: samples run one after another, each with the same calls and the same
// thread count whatever S is, so sample j's bits never depend on its batch companions.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "compute_dtype.h"
#include "gather.h"
#include "gemm.h"
#include "parallel.h"

#include <array>
#include <cmath>
#include <optional>
#include <string_view>

namespace bpp {
namespace {

void check_inputs(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down_t,
                  const at::Tensor& keep_idx, const at::Tensor& keep_count, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(x.dim() >= 2, "masked_swiglu: x must be (S, ..., d), got ", x.sizes());
  TORCH_CHECK(w_down_t.dim() == 2, "masked_swiglu: w_down_t must be (m, d), got ", w_down_t.sizes());
  const int64_t S = x.size(0), m = w_down_t.size(0), d = w_down_t.size(1);
  TORCH_CHECK(w_gate_up.dim() == 3 && w_gate_up.size(0) == m && w_gate_up.size(1) == 2 && w_gate_up.size(2) == d,
              "masked_swiglu: w_gate_up must be (m=", m, ", 2, d=", d, ") to match w_down_t, got ", w_gate_up.sizes());
  TORCH_CHECK(x.size(-1) == d, "masked_swiglu: x's last dim ", x.size(-1), " != hidden size ", d);
  TORCH_CHECK(x.scalar_type() == w_gate_up.scalar_type() && x.scalar_type() == w_down_t.scalar_type(),
              "masked_swiglu: x and the weights must share a dtype, got ", x.scalar_type(), ", ",
              w_gate_up.scalar_type(), ", ", w_down_t.scalar_type());
  TORCH_CHECK(keep_idx.scalar_type() == at::kInt && keep_count.scalar_type() == at::kInt,
              "masked_swiglu: keep_idx and keep_count must be int32 (use mask_to_index), got ",
              keep_idx.scalar_type(), " and ", keep_count.scalar_type());
  TORCH_CHECK(keep_idx.dim() == 2 && keep_idx.size(0) == S && keep_idx.size(1) == m && keep_count.dim() == 1 &&
                  keep_count.size(0) == S,
              "masked_swiglu: keep_idx must be (S=", S, ", m=", m, ") and keep_count (S,), got ", keep_idx.sizes(),
              " and ", keep_count.sizes());
  TORCH_CHECK(!scale || (scale->dim() == 2 && scale->size(0) == S && scale->size(1) == m &&
                         at::isFloatingType(scale->scalar_type())),
              "masked_swiglu: unit_scale must be a floating (S=", S, ", m=", m, ") tensor aligned with keep_idx");
  TORCH_CHECK(x.device().is_cpu() && w_gate_up.device().is_cpu() && w_down_t.device().is_cpu(),
              "masked_swiglu: the cpp backend takes CPU tensors only");
}

enum class GluActivation { kSilu, kGeluTanh };

GluActivation parse_activation(std::string_view name) {
  if (name == "silu") return GluActivation::kSilu;
  if (name == "gelu_tanh") return GluActivation::kGeluTanh;
  TORCH_CHECK_VALUE(false, "masked_swiglu: activation must be 'silu' or 'gelu_tanh', got '", name, "'");
}

// tanh-GELU as torch's gelu(approximate="tanh"): 0.5 g (1 + tanh(k (g + c g^3))), k = sqrt(2 / pi)
constexpr float kGeluK = 0.7978845608028654f, kGeluC = 0.044715f;

// act(g) in float; p receives what glu_gate_grad needs again (sigmoid(g) for SiLU, the tanh for GELU).
template <GluActivation kAct>
inline float glu_act(float g, float& p) {
  if constexpr (kAct == GluActivation::kSilu) {
    p = 1.f / (1.f + std::exp(-g));
    return g * p;
  } else {
    p = std::tanh(kGeluK * (g + kGeluC * g * g * g));
    return 0.5f * g * (1.f + p);
  }
}

// dG = (dA * U) * act'(g), from glu_act's p.
template <GluActivation kAct>
inline float glu_gate_grad(float g, float p, float da_u) {
  if constexpr (kAct == GluActivation::kSilu) {
    return da_u * p * (1.f + g * (1.f - p));
  } else {
    return da_u * (0.5f * (1.f + p) + 0.5f * g * (1.f - p * p) * kGeluK * (1.f + 3.f * kGeluC * g * g));
  }
}

// Count and kept indices of sample s, validated.
int64_t kept_units(const int32_t* counts, const int32_t* indices, int64_t s, int64_t m) {
  const int64_t c = counts[s];
  TORCH_CHECK(c >= 0 && c <= m, "masked_swiglu: keep_count[", s, "] = ", c, " is outside [0, m=", m, "]");
  const int32_t* kept = indices + s * m;
  for (int64_t j = 0; j < c; ++j)
    TORCH_CHECK(kept[j] >= 0 && kept[j] < m, "masked_swiglu: keep_idx[", s, ", ", j, "] = ", kept[j],
                " is outside [0, m=", m, ")");
  return c;
}

// (2c, d) block of the kept channels' gate rows, then their up rows, and the (c, d) W_down^T rows.
std::pair<at::Tensor, at::Tensor> gather_weights(const at::Tensor& wgu, const at::Tensor& wdt, const int32_t* kept,
                                                 int64_t c, int64_t d) {
  const int64_t elem = wgu.element_size();
  auto w = at::empty({2 * c, d}, wgu.options());
  const char* wsrc = static_cast<const char*>(wgu.const_data_ptr());
  char* wdst = static_cast<char*>(w.mutable_data_ptr());
  gather_rows(wsrc, 2 * d, kept, c, d, wdst, d, elem);
  gather_rows(wsrc + d * elem, 2 * d, kept, c, d, wdst + c * d * elem, d, elem);
  auto wd = at::empty({c, d}, wdt.options());
  gather_rows(static_cast<const char*>(wdt.const_data_ptr()), d, kept, c, d, static_cast<char*>(wd.mutable_data_ptr()),
              d, elem);
  return {w, wd};
}

// In place on gu (N, 2c) = [G | U] and dh (N, c) = dY W_down^T: gu becomes [dG | dU], h (N, c)
// receives H * a (the input of W_down), dscale[j] (float, or null) the sum over rows of dH * H.
// Columns are split across threads so each dscale entry is summed by one thread in row order.
template <typename scalar_t, GluActivation kAct>
void swiglu_backward_pass(at::Tensor& gu, const at::Tensor& dh, at::Tensor& h, const float* a, float* dscale) {
  const int64_t N = gu.size(0), c = dh.size(1);
  scalar_t* gup = gu.mutable_data_ptr<scalar_t>();
  const scalar_t* dhp = dh.const_data_ptr<scalar_t>();
  scalar_t* hp = h.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, c, grain_for(N, 16), [&](int64_t begin, int64_t end) {
    for (int64_t n = 0; n < N; ++n) {
      scalar_t* row = gup + n * 2 * c;
      for (int64_t j = begin; j < end; ++j) {
        const float g = static_cast<float>(row[j]), u = static_cast<float>(row[c + j]);
        float p;
        const float act = glu_act<kAct>(g, p), hv = act * u;
        float d = static_cast<float>(dhp[n * c + j]);
        if (dscale != nullptr) dscale[j] += d * hv;
        const float aj = a != nullptr ? a[j] : 1.f;
        d *= aj;
        row[j] = static_cast<scalar_t>(glu_gate_grad<kAct>(g, p, d * u));
        row[c + j] = static_cast<scalar_t>(d * act);
        hp[n * c + j] = static_cast<scalar_t>(hv * aj);
      }
    }
  });
}

}  // namespace

at::Tensor masked_swiglu_cpu(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down_t,
                             const at::Tensor& keep_idx, const at::Tensor& keep_count,
                             const std::optional<at::Tensor>& unit_scale, std::string_view activation) {
  check_inputs(x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale);
  const auto act_kind = parse_activation(activation);
  const int64_t S = x.size(0), m = w_down_t.size(0), d = w_down_t.size(1);
  const auto xs = x.reshape({S, -1, d}).contiguous();
  const auto wgu = w_gate_up.contiguous(), wdt = w_down_t.contiguous();
  const auto idx_all = keep_idx.contiguous(), cnt_all = keep_count.contiguous();
  const int32_t* counts = cnt_all.const_data_ptr<int32_t>();
  const int32_t* indices = idx_all.const_data_ptr<int32_t>();
  const auto compute = compute_dtype(xs.scalar_type());  // see compute_dtype.h
  std::optional<at::Tensor> scale;
  if (unit_scale) scale = unit_scale->to(compute).contiguous();
  auto out = at::empty_like(xs);

  for (int64_t s = 0; s < S; ++s) {
    const int64_t c = kept_units(counts, indices, s, m);
    auto dst = out[s];  // (N, d)
    if (c == 0) {
      dst.zero_();
      continue;
    }
    const auto [w, wd] = gather_weights(wgu, wdt, indices + s * m, c, d);
    const auto xc = xs[s].to(compute);
    auto gate_up = gemm_nt(xc, w.to(compute));  // (N, 2c) = [gate | up]
    auto act = gate_up.narrow(1, 0, c);
    if (act_kind == GluActivation::kSilu) {
      at::silu_(act);
    } else {
      at::gelu_(act, "tanh");
    }
    act.mul_(gate_up.narrow(1, c, c));
    if (scale) act.mul_((*scale)[s].narrow(0, 0, c).view({1, c}));
    gemm_nt_into(dst, act, wd.to(compute).t());
  }
  return out.view(x.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_swiglu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down_t,
    const at::Tensor& keep_idx, const at::Tensor& keep_count, const std::optional<at::Tensor>& unit_scale,
    std::string_view activation, std::array<bool, 4> output_mask) {
  check_inputs(x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale);
  const auto act_kind = parse_activation(activation);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "masked_swiglu_backward: grad_out ", grad_out.sizes(), " != x ",
              x.sizes());
  const int64_t S = x.size(0), m = w_down_t.size(0), d = w_down_t.size(1);
  const auto xs = x.reshape({S, -1, d}).contiguous();
  const auto gys = grad_out.reshape({S, -1, d}).contiguous();
  const int64_t N = xs.size(1);
  const auto wgu = w_gate_up.contiguous(), wdt = w_down_t.contiguous();
  const auto idx_all = keep_idx.contiguous(), cnt_all = keep_count.contiguous();
  const int32_t* counts = cnt_all.const_data_ptr<int32_t>();
  const int32_t* indices = idx_all.const_data_ptr<int32_t>();
  const auto compute = compute_dtype(xs.scalar_type());
  const auto fopt = xs.options().dtype(at::kFloat);
  const bool need_x = output_mask[0], need_wgu = output_mask[1], need_wdt = output_mask[2];
  const bool need_scale = output_mask[3] && unit_scale.has_value();
  std::optional<at::Tensor> scale;
  if (unit_scale) scale = unit_scale->to(at::kFloat).contiguous();

  // a fresh (0,) tensor per unwanted output: the outputs of an op must not alias
  const auto empty = [&] { return at::empty({0}, xs.options()); };
  auto dx = need_x ? at::empty_like(xs) : empty();
  auto dwgu = need_wgu ? at::zeros({m, 2, d}, fopt) : empty();  // float accumulators
  auto dwdt = need_wdt ? at::zeros({m, d}, fopt) : empty();
  auto dscale = need_scale ? at::zeros({S, m}, fopt) : empty();

  for (int64_t s = 0; s < S; ++s) {
    const int64_t c = kept_units(counts, indices, s, m);
    if (c == 0) {
      if (need_x) dx[s].zero_();
      continue;
    }
    const int32_t* kept = indices + s * m;
    const auto [wg, wdg] = gather_weights(wgu, wdt, kept, c, d);
    const auto w = wg.to(compute), wd = wdg.to(compute);
    const auto xc = xs[s].to(compute), gy = gys[s].to(compute);
    auto gu = gemm_nt(xc, w).contiguous();  // (N, 2c) = [G | U], becomes [dG | dU]
    const auto dh = gemm_nt(gy, wd).contiguous();  // (N, c): dY W_down^T
    auto h = at::empty({N, c}, gu.options());
    const float* a = scale ? scale->const_data_ptr<float>() + s * m : nullptr;
    float* ds = need_scale ? dscale.mutable_data_ptr<float>() + s * m : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gu.scalar_type(), "masked_swiglu_backward", [&] {
      if (act_kind == GluActivation::kSilu) {
        swiglu_backward_pass<scalar_t, GluActivation::kSilu>(gu, dh, h, a, ds);
      } else {
        swiglu_backward_pass<scalar_t, GluActivation::kGeluTanh>(gu, dh, h, a, ds);
      }
    });
    if (need_x) {
      auto dst = dx[s];
      gemm_nt_into(dst, gu, w.t());
    }
    if (need_wdt) {
      const auto g = at::mm(h.t(), gy).to(at::kFloat).contiguous();  // (c, d)
      scatter_add_rows(dwdt.mutable_data_ptr<float>(), d, kept, c, d, g, d);
    }
    if (need_wgu) {
      const auto g = at::mm(gu.t(), xc).to(at::kFloat).contiguous();  // (2c, d): gate rows, then up rows
      scatter_add_rows(dwgu.mutable_data_ptr<float>(), 2 * d, kept, c, d, g, d);
      scatter_add_rows(dwgu.mutable_data_ptr<float>() + d, 2 * d, kept, c, d, g.narrow(0, c, c), d);
    }
  }
  const auto wdtype = w_gate_up.scalar_type();
  return {need_x ? dx.view(x.sizes()) : dx, need_wgu ? dwgu.to(wdtype) : dwgu, need_wdt ? dwdt.to(wdtype) : dwdt,
          need_scale ? dscale.to(unit_scale->scalar_type()) : dscale};
}

}  // namespace bpp

TORCH_LIBRARY_IMPL(bpp, CPU, m) {
  m.impl("masked_swiglu", &bpp::masked_swiglu_cpu);
  m.impl("masked_swiglu_backward", &bpp::masked_swiglu_backward_cpu);
}
