// CPU masked gated MLP (SwiGLU, or GeGLU with activation "gelu_tanh"). Forward, per sample s with
// c kept channels:
//   1. copy the kept rows of the interleaved gate/up weight into one (2c, d) block, gate rows
//      first, then up rows (plain memcpy per row: ATen's index_select copies slice by slice
//      and measured ~20x slower than the GEMM input it produces needs);
//   2. one GEMM gives gate and up side by side, (N, 2c) = [G | U]; masked_swiglu_with_gate_up
//      also copies it into its second output, the projections the backward reads instead of
//      recomputing them (memory N * 2c per sample: proportional to the kept channels);
//   3. one fused fp32 pass (glu.h) writes the (N, c) activation act(G) * U * unit_scale,
//      contiguous (oneDNN reads a strided one measurably slower);
//   4. one GEMM against the gathered rows of W_down^T, written into out[s].
// Backward, per sample, in blocks of kChannelBlock kept channels: the block's weight rows are
// gathered, its [G | U] read from the forward's projections (or recomputed, one GEMM, after the
// plain forward) and dH = dY W_down^T (one GEMM); one fused fp32 pass (glu.h) gives [dG | dU], H
// and the scale gradients; then dX += [dG | dU] W (one GEMM, accumulated over the blocks in dX)
// and the block's weight gradients dW = [dG | dU]^T X, dW_down = H^T dY (two GEMMs) go into float
// accumulators row by row, written by a channel's first sample and added to by the others (no zero
// fill). Pruned rows are never read and get an exact zero gradient.
// fp16/bf16 are computed in fp32 on CPUs without native half-precision GEMMs (compute_dtype.h).
// Batch invariance: samples run one after another, each with the same calls and the same
// thread count whatever S is, so sample j's bits never depend on its batch companions.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "compute_dtype.h"
#include "gather.h"
#include "gemm.h"
#include "glu.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>
#include <vector>

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

GluActivation parse_activation(std::string_view name) {
  if (name == "silu") return GluActivation::kSilu;
  if (name == "gelu_tanh") return GluActivation::kGeluTanh;
  TORCH_CHECK_VALUE(false, "masked_swiglu: activation must be 'silu' or 'gelu_tanh', got '", name, "'");
}

// Kept channels per backward block: bounds the backward's scratch (gathered weights, [dG | dU], H)
// for wide MLPs. Blocks of 256 measured no faster on one thread at the research shape (S 8, N 256,
// d 576, c 768) and much slower on two threads of a busy machine (three times the GEMM calls, each
// a parallel region), so a block is as wide as a typical sample's kept channels. A constant, not a
// function of S.
constexpr int64_t kChannelBlock = 1024;

// Validates every sample's count and kept indices; returns the counts' sum.
int64_t validate_kept(const int32_t* counts, const int32_t* indices, int64_t S, int64_t m) {
  int64_t total = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t c = counts[s];
    TORCH_CHECK(c >= 0 && c <= m, "masked_swiglu: keep_count[", s, "] = ", c, " is outside [0, m=", m, "]");
    const int32_t* kept = indices + s * m;
    for (int64_t j = 0; j < c; ++j)
      TORCH_CHECK(kept[j] >= 0 && kept[j] < m, "masked_swiglu: keep_idx[", s, ", ", j, "] = ", kept[j],
                  " is outside [0, m=", m, ")");
    total += c;
  }
  return total;
}

// w (2n, d) = the gate rows of the n channels kept[0..n), then their up rows; wd (n, d) = their
// W_down^T rows. Into the first rows of the flat scratch tensors w_flat, wd_flat (the weights' dtype).
std::pair<at::Tensor, at::Tensor> gather_weights(const at::Tensor& wgu, const at::Tensor& wdt, const int32_t* kept,
                                                 int64_t n, int64_t d, const at::Tensor& w_flat,
                                                 const at::Tensor& wd_flat) {
  const int64_t elem = wgu.element_size();
  auto w = w_flat.narrow(0, 0, 2 * n * d).view({2 * n, d}), wd = wd_flat.narrow(0, 0, n * d).view({n, d});
  const char* wsrc = static_cast<const char*>(wgu.const_data_ptr());
  char* wdst = static_cast<char*>(w.mutable_data_ptr());
  gather_rows(wsrc, 2 * d, kept, n, d, wdst, d, elem);
  gather_rows(wsrc + d * elem, 2 * d, kept, n, d, wdst + n * d * elem, d, elem);
  gather_rows(static_cast<const char*>(wdt.const_data_ptr()), d, kept, n, d, static_cast<char*>(wd.mutable_data_ptr()),
              d, elem);
  return {w, wd};
}

// dst (+)= a @ b through mm, in place when dst has a's dtype (else through one temporary).
void mm_acc(at::Tensor& dst, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (dst.scalar_type() == a.scalar_type()) {
    if (accumulate) {
      dst.addmm_(a, b);
    } else {
      at::mm_out(dst, a, b);
    }
  } else if (accumulate) {
    dst.add_(at::mm(a, b));
  } else {
    dst.copy_(at::mm(a, b));
  }
}

// Adds one block's weight gradients into the float accumulator rows of its channels: for j < n,
// rows (kept[j] * rows_per_unit + r) of acc (width floats each, acc_stride apart) receive rows
// (r * n + j) of src (width floats each, contiguous), r < rows_per_unit. A channel's first block
// (seen[kept[j]] == 0) writes its rows instead, so the accumulators need no zero fill (the caller
// zeroes the rows of channels no sample keeps) and the first write reads nothing. Memory-bound:
// a parallel region only for ~1M floats per task, as for the fused passes (glu.h).
void accumulate_rows(float* acc, int64_t acc_stride, int64_t rows_per_unit, const int32_t* kept, int64_t n,
                     int64_t width, const at::Tensor& src, const uint8_t* seen) {
  const float* src_p = src.const_data_ptr<float>();
  at::parallel_for(0, n, fused_grain(rows_per_unit * width), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t r = 0; r < rows_per_unit; ++r) {
        float* a = acc + (kept[j] * rows_per_unit + r) * acc_stride;
        const float* b = src_p + (r * n + j) * width;
        if (seen[kept[j]]) {
          for (int64_t e = 0; e < width; ++e) a[e] += b[e];
        } else {
          std::memcpy(a, b, width * sizeof(float));
        }
      }
    }
  });
}

// One backward block between its GEMMs, in fp32 (glu.h): from G, U (the block's gate and up
// projections, (N, n) views) and dh = dY W_down^T, returns [dG | dU] (N, 2n) and H * a (the input
// of W_down), both in the compute dtype; dscale (the block's n floats, zero, or null) receives the
// sums over rows of dH * H. a: the block's n float scales, or null.
std::pair<at::Tensor, at::Tensor> backward_between_gemms(const at::Tensor& g, const at::Tensor& u,
                                                         const at::Tensor& dh, GluActivation act_kind,
                                                         const float* a, float* dscale, at::ScalarType compute) {
  const auto gf = g.to(at::kFloat), uf = u.to(at::kFloat);
  const auto dhf = dh.to(at::kFloat).contiguous();
  TORCH_INTERNAL_ASSERT(gf.stride(1) == 1 && uf.stride(1) == 1 && gf.stride(0) == uf.stride(0));
  const int64_t N = g.size(0), n = g.size(1);
  auto dgu = at::empty({N, 2 * n}, dhf.options()), h = at::empty({N, n}, dhf.options());
  glu_backward(act_kind, gf.const_data_ptr<float>(), uf.const_data_ptr<float>(), gf.stride(0),
               dhf.const_data_ptr<float>(), N, n, a, dgu.mutable_data_ptr<float>(), h.mutable_data_ptr<float>(),
               dscale);
  return {dgu.to(compute), h.to(compute)};
}

// The forward of both ops; gate_up (when save) receives every sample's (N, 2c) [G | U], flat, in
// x's dtype.
std::pair<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down_t,
                                          const at::Tensor& keep_idx, const at::Tensor& keep_count,
                                          const std::optional<at::Tensor>& unit_scale, std::string_view activation,
                                          bool save) {
  check_inputs(x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale);
  const auto act_kind = parse_activation(activation);
  const int64_t S = x.size(0), m = w_down_t.size(0), d = w_down_t.size(1);
  const auto xs = x.reshape({S, -1, d}).contiguous();
  const int64_t N = xs.size(1);
  const auto wgu = w_gate_up.contiguous(), wdt = w_down_t.contiguous();
  const auto idx_all = keep_idx.contiguous(), cnt_all = keep_count.contiguous();
  const int32_t* counts = cnt_all.const_data_ptr<int32_t>();
  const int32_t* indices = idx_all.const_data_ptr<int32_t>();
  const int64_t total = validate_kept(counts, indices, S, m);
  const auto compute = compute_dtype(xs.scalar_type());  // see compute_dtype.h
  std::optional<at::Tensor> scale;
  if (unit_scale) scale = unit_scale->to(at::kFloat).contiguous();
  auto out = at::empty_like(xs);
  auto gate_up_all = at::empty({save ? N * 2 * total : 0}, xs.options());
  int64_t max_c = 0;
  for (int64_t s = 0; s < S; ++s) max_c = std::max<int64_t>(max_c, counts[s]);
  const auto w_flat = at::empty({2 * max_c * d}, wgu.options()), wd_flat = at::empty({max_c * d}, wdt.options());

  int64_t offset = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t c = counts[s];
    auto dst = out[s];  // (N, d)
    if (c == 0) {
      dst.zero_();
      continue;
    }
    const auto [w, wd] = gather_weights(wgu, wdt, indices + s * m, c, d, w_flat, wd_flat);
    const auto xc = xs[s].to(compute);
    auto gate_up = gemm_nt(xc, w.to(compute));  // (N, 2c) = [gate | up]
    if (save) {
      gate_up_all.narrow(0, offset, N * 2 * c).view({N, 2 * c}).copy_(gate_up);
      offset += N * 2 * c;
    }
    const auto guf = gate_up.to(at::kFloat).contiguous();
    auto act = at::empty({N, c}, guf.options());  // act(G) * U * a, contiguous (glu.h)
    glu_forward(act_kind, guf.const_data_ptr<float>(), N, c,
                scale ? scale->const_data_ptr<float>() + s * m : nullptr, act.mutable_data_ptr<float>());
    gemm_nt_into(dst, act.to(compute), wd.to(compute).t());
  }
  return {out.view(x.sizes()), gate_up_all};
}

}  // namespace

at::Tensor masked_swiglu_cpu(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down_t,
                             const at::Tensor& keep_idx, const at::Tensor& keep_count,
                             const std::optional<at::Tensor>& unit_scale, std::string_view activation) {
  return forward(x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale, activation, false).first;
}

std::tuple<at::Tensor, at::Tensor> masked_swiglu_with_gate_up_cpu(
    const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down_t, const at::Tensor& keep_idx,
    const at::Tensor& keep_count, const std::optional<at::Tensor>& unit_scale, std::string_view activation) {
  auto [y, gate_up] = forward(x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale, activation, true);
  return {y, gate_up};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_swiglu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down_t,
    const at::Tensor& keep_idx, const at::Tensor& keep_count, const std::optional<at::Tensor>& unit_scale,
    const std::optional<at::Tensor>& gate_up, std::string_view activation, std::array<bool, 4> output_mask) {
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
  const int64_t total = validate_kept(counts, indices, S, m);
  TORCH_CHECK(!gate_up || (gate_up->dim() == 1 && gate_up->numel() == N * 2 * total &&
                           gate_up->scalar_type() == xs.scalar_type()),
              "masked_swiglu_backward: gate_up must be the second output of masked_swiglu_with_gate_up on these "
              "inputs (", N * 2 * total, " values of ", xs.scalar_type(), ")");
  const auto compute = compute_dtype(xs.scalar_type());
  const auto fopt = xs.options().dtype(at::kFloat);
  const bool need_x = output_mask[0], need_wgu = output_mask[1], need_wdt = output_mask[2];
  const bool need_scale = output_mask[3] && unit_scale.has_value();
  std::optional<at::Tensor> scale;
  if (unit_scale) scale = unit_scale->to(at::kFloat).contiguous();

  // a fresh (0,) tensor per unwanted output: the outputs of an op must not alias
  const auto empty = [&] { return at::empty({0}, xs.options()); };
  auto dx = need_x ? at::empty_like(xs) : empty();
  // float accumulators, each row written first by its channel's first sample (accumulate_rows)
  auto dwgu = need_wgu ? at::empty({m, 2, d}, fopt) : empty();
  auto dwdt = need_wdt ? at::empty({m, d}, fopt) : empty();
  std::vector<uint8_t> seen(m, 0);  // whether a sample before has kept the channel
  auto dscale = need_scale ? at::zeros({S, m}, fopt) : empty();
  int64_t block = 0;  // the widest block any sample needs
  for (int64_t s = 0; s < S; ++s) block = std::max<int64_t>(block, std::min<int64_t>(counts[s], kChannelBlock));
  const auto w_flat = at::empty({2 * block * d}, wgu.options()), wd_flat = at::empty({block * d}, wdt.options());
  // dX adds up over the blocks in dx itself, or in a float accumulator when dx is narrower
  const bool dx_direct = xs.scalar_type() == at::kFloat;
  auto dx_acc = need_x && !dx_direct ? at::empty({N, d}, fopt) : at::Tensor();

  int64_t offset = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t c = counts[s];
    if (c == 0) {
      if (need_x) dx[s].zero_();
      continue;
    }
    const auto xc = xs[s].to(compute), gy = gys[s].to(compute);
    at::Tensor gu_s;  // (N, 2c) [G | U] of the forward
    if (gate_up) {
      gu_s = gate_up->narrow(0, offset, N * 2 * c).view({N, 2 * c}).to(compute);
      offset += N * 2 * c;
    }
    auto dxs = need_x ? (dx_direct ? dx[s] : dx_acc) : at::Tensor();
    for (int64_t j0 = 0; j0 < c; j0 += kChannelBlock) {
      const int64_t n = std::min(kChannelBlock, c - j0);
      const int32_t* kept = indices + s * m + j0;
      const auto [wg, wdg] = gather_weights(wgu, wdt, kept, n, d, w_flat, wd_flat);
      const auto w = wg.to(compute), wd = wdg.to(compute);
      at::Tensor g, u;
      if (gu_s.defined()) {
        g = gu_s.narrow(1, j0, n);
        u = gu_s.narrow(1, c + j0, n);
      } else {  // recomputed with the forward's GEMM library
        const auto gu = gemm_nt(xc, w);
        g = gu.narrow(1, 0, n);
        u = gu.narrow(1, n, n);
      }
      const auto dh = at::mm(gy, wd.t());  // (N, n): dY W_down^T
      const float* a = scale ? scale->const_data_ptr<float>() + s * m + j0 : nullptr;
      float* ds = need_scale ? dscale.mutable_data_ptr<float>() + s * m + j0 : nullptr;
      const auto [dgu, h] = backward_between_gemms(g, u, dh, act_kind, a, ds, compute);
      if (need_x) mm_acc(dxs, dgu, w, j0 > 0);  // dX += [dG | dU] W
      if (need_wgu) {  // (2n, d): the gate rows' gradients, then the up rows'
        const auto gw = at::mm(dgu.t(), xc).to(at::kFloat).contiguous();
        accumulate_rows(dwgu.mutable_data_ptr<float>(), d, 2, kept, n, d, gw, seen.data());
      }
      if (need_wdt) {
        const auto gw = at::mm(h.t(), gy).to(at::kFloat).contiguous();  // (n, d)
        accumulate_rows(dwdt.mutable_data_ptr<float>(), d, 1, kept, n, d, gw, seen.data());
      }
      for (int64_t j = 0; j < n; ++j) seen[kept[j]] = 1;
    }
    if (need_x && !dx_direct) dx[s].copy_(dxs);
  }
  for (int64_t u = 0; u < m; ++u) {  // the channels no sample keeps: exactly zero
    if (seen[u]) continue;
    if (need_wgu) std::memset(dwgu.mutable_data_ptr<float>() + u * 2 * d, 0, 2 * d * sizeof(float));
    if (need_wdt) std::memset(dwdt.mutable_data_ptr<float>() + u * d, 0, d * sizeof(float));
  }
  const auto wdtype = w_gate_up.scalar_type();
  return {need_x ? dx.view(x.sizes()) : dx, need_wgu ? dwgu.to(wdtype) : dwgu, need_wdt ? dwdt.to(wdtype) : dwdt,
          need_scale ? dscale.to(unit_scale->scalar_type()) : dscale};
}

}  // namespace bpp

TORCH_LIBRARY_IMPL(bpp, CPU, m) {
  m.impl("masked_swiglu", &bpp::masked_swiglu_cpu);
  m.impl("masked_swiglu_with_gate_up", &bpp::masked_swiglu_with_gate_up_cpu);
  m.impl("masked_swiglu_backward", &bpp::masked_swiglu_backward_cpu);
}
