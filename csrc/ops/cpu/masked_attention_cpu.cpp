// CPU masked attention. Per sample: one GEMM (with the bias fused by addmm) projects only the
// kept groups' contiguous q/k/v rows; one parallel pass applies the per-head RMSNorm (Qwen3) and
// RoPE while scattering heads into the (B, heads, T, hd) layouts attention wants (no cat/neg
// temporaries, no repeat of K/V: attention runs with enable_gqa); one GEMM reduces the kept
// heads through the gathered rows of W_o^T. Each sample is computed alone: batch invariant.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

namespace bpp {
namespace {

template <typename scalar_t>
void norm_rope_scatter(const at::Tensor& qkv, const std::optional<at::Tensor>& q_norm,
                       const std::optional<at::Tensor>& k_norm, const at::Tensor& cos, const at::Tensor& sin,
                       at::Tensor& q, at::Tensor& k, at::Tensor& v, int64_t B, int64_t T, int64_t c, int64_t r,
                       int64_t hd, double eps) {
  // qkv (B, T, c, r + 2, hd) -> q (B, c*r, T, hd), k and v (B, c, T, hd)
  const scalar_t* src = qkv.const_data_ptr<scalar_t>();
  const scalar_t* cs = cos.const_data_ptr<scalar_t>();
  const scalar_t* sn = sin.const_data_ptr<scalar_t>();
  const scalar_t* qw = q_norm ? q_norm->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* kw = k_norm ? k_norm->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* qd = q.mutable_data_ptr<scalar_t>();
  scalar_t* kd = k.mutable_data_ptr<scalar_t>();
  scalar_t* vd = v.mutable_data_ptr<scalar_t>();
  const int64_t half = hd / 2;
  at::parallel_for(0, B * T, 8, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> buf(hd);
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      for (int64_t j = 0; j < c; ++j) {
        for (int64_t h = 0; h < r + 2; ++h) {
          const scalar_t* x = src + ((bt * c + j) * (r + 2) + h) * hd;
          if (h == r + 1) {  // value: copied as is
            std::copy(x, x + hd, vd + ((b * c + j) * T + t) * hd);
            continue;
          }
          const scalar_t* w = h < r ? qw : kw;
          if (w != nullptr) {  // RMSNorm over the head: float statistics, cast, then the weight
            float ss = 0.f;
            for (int64_t e = 0; e < hd; ++e) ss += static_cast<float>(x[e]) * static_cast<float>(x[e]);
            const float rstd = 1.f / std::sqrt(ss / hd + static_cast<float>(eps));
            for (int64_t e = 0; e < hd; ++e)
              buf[e] = static_cast<scalar_t>(w[e] * static_cast<scalar_t>(static_cast<float>(x[e]) * rstd));
          } else {
            std::copy(x, x + hd, buf.begin());
          }
          scalar_t* dst = h < r ? qd + ((b * c * r + j * r + h) * T + t) * hd : kd + ((b * c + j) * T + t) * hd;
          const scalar_t* ct = cs + t * hd;
          const scalar_t* st = sn + t * hd;
          for (int64_t e = 0; e < half; ++e) {  // rotate-half RoPE
            dst[e] = static_cast<scalar_t>(buf[e] * ct[e] - buf[e + half] * st[e]);
            dst[e + half] = static_cast<scalar_t>(buf[e + half] * ct[e + half] + buf[e] * st[e + half]);
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor masked_attention_cpu(const at::Tensor& x, const at::Tensor& w_qkv, const at::Tensor& w_o_t,
                                const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& keep_idx,
                                const at::Tensor& keep_count, const std::optional<at::Tensor>& b_qkv,
                                const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                                double norm_eps, double scale) {
  TORCH_CHECK(x.dim() == 4, "masked_attention: x must be (S, B, T, d)");
  TORCH_CHECK(w_qkv.dim() == 3 && cos.dim() == 2, "masked_attention: w_qkv must be (G, (r+2)*hd, d), cos (T, hd)");
  TORCH_CHECK(keep_idx.scalar_type() == at::kInt && keep_count.scalar_type() == at::kInt,
              "masked_attention: keep_idx and keep_count must be int32");
  const int64_t S = x.size(0), B = x.size(1), T = x.size(2), d = x.size(3);
  const int64_t G = w_qkv.size(0), rows = w_qkv.size(1), hd = cos.size(1), r = rows / hd - 2;
  const auto xs = x.contiguous();
  auto out = at::zeros_like(xs);
  const auto counts = keep_count.contiguous();
  const int32_t* count = counts.const_data_ptr<int32_t>();
  const auto wqkv = w_qkv.contiguous(), wot = w_o_t.contiguous();
  const auto cs = cos.to(xs.scalar_type()).contiguous(), sn = sin.to(xs.scalar_type()).contiguous();
  std::optional<at::Tensor> qn, kn;
  if (q_norm) qn = q_norm->contiguous();
  if (k_norm) kn = k_norm->contiguous();
  for (const auto s : c10::irange(S)) {
    const int64_t c = count[s];
    if (c == 0) continue;
    const auto kept = keep_idx[s].narrow(0, 0, c).to(at::kLong);
    const auto w = wqkv.index_select(0, kept).view({c * rows, d});
    const auto xb = xs[s].view({B * T, d});
    const auto qkv = b_qkv ? at::addmm(b_qkv->index_select(0, kept).view({c * rows}), xb, w.t()) : at::mm(xb, w.t());
    auto q = at::empty({B, c * r, T, hd}, xs.options());
    auto k = at::empty({B, c, T, hd}, xs.options());
    auto v = at::empty({B, c, T, hd}, xs.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "masked_attention_cpu", [&] {
      norm_rope_scatter<scalar_t>(qkv, qn, kn, cs, sn, q, k, v, B, T, c, r, hd, norm_eps);
    });
    const auto att = at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, /*is_causal=*/true, scale,
                                                      /*enable_gqa=*/true);
    auto dst = out[s].view({B * T, d});
    at::mm_out(dst, att.transpose(1, 2).reshape({B * T, c * r * hd}), wot.index_select(0, kept).view({c * r * hd, d}));
  }
  return out;
}

}  // namespace bpp

TORCH_LIBRARY_IMPL(bpp, CPU, m) {
  m.impl("masked_attention", &bpp::masked_attention_cpu);
}
