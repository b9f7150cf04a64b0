// CPU masked non-gated MLP (OPT, GPT-2, Pythia). Per sample s with c kept channels:
//   1. copy the kept rows of w_up and w_down_t, and the kept entries of b_up, into contiguous
//      (c, d), (c, d) and (c,) blocks (one memcpy per row, as masked_swiglu_cpu.cpp does);
//   2. one GEMM (with the bias) gives the (N, c) pre-activations Z;
//   3. the activation in place on Z (ATen's vectorised gelu / relu), then *= unit_scale;
//   4. one GEMM against the gathered rows of W_down^T, written straight into out[s].
// The down projection's bias is not part of the op; a sample that keeps nothing gets zeros.
// Backward, per sample: the same gathers, Z recomputed (one GEMM, the forward's library, so the
// same bits) and dH = dY W_down^T (one GEMM); dscale = column sums of dH * act(Z); dZ = act'(Z) *
// dH * a (ATen's gelu_backward / threshold_backward, vectorised); then dX = dZ W_up (one GEMM) and
// the kept rows' gradients dW_up = dZ^T X, dW_down = (act(Z) a)^T dY (two GEMMs), db_up = column
// sums of dZ, added into float accumulators row by row. Pruned rows are never read and keep a
// zero gradient.
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
#include <optional>
#include <string_view>

namespace bpp {
namespace {

enum class Activation { kGelu, kGeluTanh, kRelu };

Activation parse_activation(std::string_view name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  TORCH_CHECK(name == "relu", "masked_mlp: activation='", std::string(name),
              "' is not one of gelu, gelu_tanh, relu");
  return Activation::kRelu;
}

void activation_(at::Tensor& z, Activation act) {
  if (act == Activation::kRelu) {
    at::relu_(z);
  } else {
    at::gelu_(z, act == Activation::kGelu ? "none" : "tanh");
  }
}

at::Tensor activation(const at::Tensor& z, Activation act) {
  if (act == Activation::kRelu) return at::relu(z);
  return at::gelu(z, act == Activation::kGelu ? "none" : "tanh");
}

// grad * act'(z)
at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& z, Activation act) {
  if (act == Activation::kRelu) return at::threshold_backward(grad, z, 0);
  return at::gelu_backward(grad, z, act == Activation::kGelu ? "none" : "tanh");
}

void check_inputs(const at::Tensor& x, const at::Tensor& w_up, const at::Tensor& w_down_t, const at::Tensor& keep_idx,
                  const at::Tensor& keep_count, const std::optional<at::Tensor>& b_up,
                  const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(x.dim() >= 2, "masked_mlp: x must be (S, ..., d), got ", x.sizes());
  TORCH_CHECK(w_down_t.dim() == 2, "masked_mlp: w_down_t must be (m, d), got ", w_down_t.sizes());
  const int64_t S = x.size(0), m = w_down_t.size(0), d = w_down_t.size(1);
  TORCH_CHECK(w_up.dim() == 2 && w_up.size(0) == m && w_up.size(1) == d, "masked_mlp: w_up must be (m=", m,
              ", d=", d, ") to match w_down_t, got ", w_up.sizes());
  TORCH_CHECK(x.size(-1) == d, "masked_mlp: x's last dim ", x.size(-1), " != hidden size ", d);
  TORCH_CHECK(x.scalar_type() == w_up.scalar_type() && x.scalar_type() == w_down_t.scalar_type(),
              "masked_mlp: x and the weights must share a dtype, got ", x.scalar_type(), ", ", w_up.scalar_type(),
              ", ", w_down_t.scalar_type());
  TORCH_CHECK(!b_up || (b_up->dim() == 1 && b_up->size(0) == m && b_up->scalar_type() == x.scalar_type()),
              "masked_mlp: b_up must be (m=", m, ",) in x's dtype");
  TORCH_CHECK(keep_idx.scalar_type() == at::kInt && keep_count.scalar_type() == at::kInt,
              "masked_mlp: keep_idx and keep_count must be int32 (use mask_to_index), got ", keep_idx.scalar_type(),
              " and ", keep_count.scalar_type());
  TORCH_CHECK(keep_idx.dim() == 2 && keep_idx.size(0) == S && keep_idx.size(1) == m && keep_count.dim() == 1 &&
                  keep_count.size(0) == S,
              "masked_mlp: keep_idx must be (S=", S, ", m=", m, ") and keep_count (S,), got ", keep_idx.sizes(),
              " and ", keep_count.sizes());
  TORCH_CHECK(!scale || (scale->dim() == 2 && scale->size(0) == S && scale->size(1) == m &&
                         at::isFloatingType(scale->scalar_type())),
              "masked_mlp: unit_scale must be a floating (S=", S, ", m=", m, ") tensor aligned with keep_idx");
  TORCH_CHECK(x.device().is_cpu() && w_up.device().is_cpu() && w_down_t.device().is_cpu() &&
                  (!b_up || b_up->device().is_cpu()),
              "masked_mlp: the cpp backend takes CPU tensors only");
}

// Count and kept indices of sample s, validated.
int64_t kept_units(const int32_t* counts, const int32_t* indices, int64_t s, int64_t m) {
  const int64_t c = counts[s];
  TORCH_CHECK(c >= 0 && c <= m, "masked_mlp: keep_count[", s, "] = ", c, " is outside [0, m=", m, "]");
  const int32_t* kept = indices + s * m;
  for (int64_t j = 0; j < c; ++j)
    TORCH_CHECK(kept[j] >= 0 && kept[j] < m, "masked_mlp: keep_idx[", s, ", ", j, "] = ", kept[j],
                " is outside [0, m=", m, ")");
  return c;
}

struct Gathered {
  at::Tensor w_up, w_down_t;   // (c, d) each, in the compute dtype
  std::optional<at::Tensor> b;  // (c,), in the compute dtype
};

// The kept channels' rows of w_up and w_down_t and entries of b_up, cast to the compute dtype.
Gathered gather_weights(const at::Tensor& wu, const at::Tensor& wdt, const std::optional<at::Tensor>& b,
                        const int32_t* kept, int64_t c, int64_t d, at::ScalarType compute) {
  const int64_t elem = wu.element_size();
  const auto rows = [&](const at::Tensor& src, int64_t width) {
    auto dst = at::empty({c, width}, src.options());
    gather_rows(static_cast<const char*>(src.const_data_ptr()), width, kept, c, width,
                static_cast<char*>(dst.mutable_data_ptr()), width, elem);
    return dst.to(compute);
  };
  Gathered g{rows(wu, d), rows(wdt, d), std::nullopt};
  if (b) g.b = rows(*b, 1).view({c});
  return g;
}

}  // namespace

at::Tensor masked_mlp_cpu(const at::Tensor& x, const at::Tensor& w_up, const at::Tensor& w_down_t,
                          const at::Tensor& keep_idx, const at::Tensor& keep_count, const std::optional<at::Tensor>& b_up,
                          const std::optional<at::Tensor>& unit_scale, c10::string_view activation_name) {
  check_inputs(x, w_up, w_down_t, keep_idx, keep_count, b_up, unit_scale);
  const Activation act = parse_activation(activation_name);
  const int64_t S = x.size(0), m = w_down_t.size(0), d = w_down_t.size(1);
  const auto xs = x.reshape({S, -1, d}).contiguous();
  const auto wu = w_up.contiguous(), wdt = w_down_t.contiguous();
  std::optional<at::Tensor> b;
  if (b_up) b = b_up->contiguous();
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
    const auto g = gather_weights(wu, wdt, b, indices + s * m, c, d, compute);
    auto h = gemm_nt(xs[s].to(compute), g.w_up, g.b);  // (N, c) pre-activations
    activation_(h, act);
    if (scale) h.mul_((*scale)[s].narrow(0, 0, c).view({1, c}));
    gemm_nt_into(dst, h, g.w_down_t.t());
  }
  return out.view(x.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_mlp_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_up, const at::Tensor& w_down_t,
    const at::Tensor& keep_idx, const at::Tensor& keep_count, const std::optional<at::Tensor>& b_up,
    const std::optional<at::Tensor>& unit_scale, c10::string_view activation_name, std::array<bool, 5> output_mask) {
  check_inputs(x, w_up, w_down_t, keep_idx, keep_count, b_up, unit_scale);
  const Activation act = parse_activation(activation_name);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "masked_mlp_backward: grad_out ", grad_out.sizes(), " != x ", x.sizes());
  const int64_t S = x.size(0), m = w_down_t.size(0), d = w_down_t.size(1);
  const auto xs = x.reshape({S, -1, d}).contiguous();
  const auto gys = grad_out.reshape({S, -1, d}).contiguous();
  const auto wu = w_up.contiguous(), wdt = w_down_t.contiguous();
  std::optional<at::Tensor> b;
  if (b_up) b = b_up->contiguous();
  const auto idx_all = keep_idx.contiguous(), cnt_all = keep_count.contiguous();
  const int32_t* counts = cnt_all.const_data_ptr<int32_t>();
  const int32_t* indices = idx_all.const_data_ptr<int32_t>();
  const auto compute = compute_dtype(xs.scalar_type());
  const auto fopt = xs.options().dtype(at::kFloat);
  const bool need_x = output_mask[0], need_wu = output_mask[1], need_wdt = output_mask[2];
  const bool need_b = output_mask[3] && b_up.has_value();
  const bool need_scale = output_mask[4] && unit_scale.has_value();
  std::optional<at::Tensor> scale;
  if (unit_scale) scale = unit_scale->to(compute).contiguous();

  // a fresh (0,) tensor per unwanted output: the outputs of an op must not alias
  const auto empty = [&] { return at::empty({0}, xs.options()); };
  auto dx = need_x ? at::empty_like(xs) : empty();
  auto dwu = need_wu ? at::zeros({m, d}, fopt) : empty();  // float accumulators
  auto dwdt = need_wdt ? at::zeros({m, d}, fopt) : empty();
  auto db = need_b ? at::zeros({m}, fopt) : empty();
  auto dscale = need_scale ? at::zeros({S, m}, fopt) : empty();

  for (int64_t s = 0; s < S; ++s) {
    const int64_t c = kept_units(counts, indices, s, m);
    if (c == 0) {
      if (need_x) dx[s].zero_();
      continue;
    }
    const int32_t* kept = indices + s * m;
    const auto g = gather_weights(wu, wdt, b, kept, c, d, compute);
    const auto xc = xs[s].to(compute), gy = gys[s].to(compute);
    const auto z = gemm_nt(xc, g.w_up, g.b);  // (N, c) pre-activations, as in the forward
    auto dh = gemm_nt(gy, g.w_down_t);        // (N, c): dY W_down^T
    at::Tensor h;                             // act(Z) * a: the input of W_down
    if (need_wdt || need_scale) h = activation(z, act);
    if (scale) {
      const auto a = (*scale)[s].narrow(0, 0, c).view({1, c});
      if (need_scale) dscale[s].narrow(0, 0, c).copy_(at::sum(dh.to(at::kFloat) * h.to(at::kFloat), {0}));
      dh.mul_(a);
      if (need_wdt) h.mul_(a);
    }
    if (need_wdt) {
      const auto gw = at::mm(h.t(), gy).to(at::kFloat).contiguous();  // (c, d)
      scatter_add_rows(dwdt.mutable_data_ptr<float>(), d, kept, c, d, gw, d);
    }
    if (!(need_x || need_wu || need_b)) continue;
    const auto dz = activation_backward(dh, z, act).contiguous();  // (N, c)
    if (need_x) {
      auto dst = dx[s];
      gemm_nt_into(dst, dz, g.w_up.t());
    }
    if (need_wu) {
      const auto gw = at::mm(dz.t(), xc).to(at::kFloat).contiguous();  // (c, d)
      scatter_add_rows(dwu.mutable_data_ptr<float>(), d, kept, c, d, gw, d);
    }
    if (need_b) {
      const auto gb = at::sum(dz, {0}, false, at::kFloat).contiguous();  // (c,)
      scatter_add_rows(db.mutable_data_ptr<float>(), 1, kept, c, 1, gb, 1);
    }
  }
  const auto wdtype = w_up.scalar_type();
  return {need_x ? dx.view(x.sizes()) : dx, need_wu ? dwu.to(wdtype) : dwu, need_wdt ? dwdt.to(wdtype) : dwdt,
          need_b ? db.to(b_up->scalar_type()) : db, need_scale ? dscale.to(unit_scale->scalar_type()) : dscale};
}

}  // namespace bpp

TORCH_LIBRARY_IMPL(bpp, CPU, m) {
  m.impl("masked_mlp", &bpp::masked_mlp_cpu);
  m.impl("masked_mlp_backward", &bpp::masked_mlp_backward_cpu);
}
