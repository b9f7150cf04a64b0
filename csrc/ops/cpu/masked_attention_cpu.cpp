// CPU masked attention. Per sample s with c kept KV groups:
//   1. copy the kept groups' weight slabs into one block ordered [q of every kept group |
//      k of every kept group | v of every kept group] (memcpy per slab: a kept group is a
//      contiguous tile, and ATen's index_select measured far slower than the copy itself);
//   2. one GEMM (bias fused by addmm) projects x onto it: qkv (B*T, c*(r+2)*hd). With that row
//      order q, k and v are plain strided views (B, heads, T, hd) of qkv, never copied;
//   3. one parallel pass applies the per-head RMSNorm (Qwen3) and RoPE in place on q and k;
//   4. attention on those views (enable_gqa: no repeat of K/V); its output is already laid out
//      (B, T, heads, hd), so it is the left operand of the last GEMM as is;
//   5. one GEMM through the kept groups' slabs of W_o^T, written straight into out[s].
// fp16/bf16 are computed in fp32 on CPUs without native half-precision GEMMs (compute_dtype.h).
// Batch invariance: samples run one after another with the same calls whatever S is.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "compute_dtype.h"
#include "gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

namespace bpp {
namespace {

// dst slab j (width elements, dst_stride apart) = src slab idx[j] (src_stride apart), j < c.
void gather_slabs(const char* src, int64_t src_stride, const int32_t* idx, int64_t c, int64_t width, char* dst,
                  int64_t dst_stride, int64_t elem_size) {
  // One thread on purpose: a few MB of memcpy is memory-bound, and on a busy machine waking the
  // pool for it measured slower (ms per parallel region) than the copy itself.
  for (int64_t j = 0; j < c; ++j)
    std::memcpy(dst + j * dst_stride * elem_size, src + idx[j] * src_stride * elem_size, width * elem_size);
}

// Rows [0, c*r*hd) of the result: q of the kept groups; then c*hd rows of k; then c*hd of v.
// The same order serves the weight (elem_per_row = d) and the bias (elem_per_row = 1).
at::Tensor gather_qkv(const at::Tensor& w, const int32_t* kept, int64_t c, int64_t r, int64_t hd,
                      int64_t elem_per_row) {
  const int64_t rows = (r + 2) * hd, q = r * hd * elem_per_row, kv = hd * elem_per_row, esz = w.element_size();
  auto out = at::empty({c * rows * elem_per_row}, w.options());
  const char* src = static_cast<const char*>(w.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t group = rows * elem_per_row;
  gather_slabs(src, group, kept, c, q, dst, q, esz);
  gather_slabs(src + q * esz, group, kept, c, kv, dst + c * q * esz, kv, esz);
  gather_slabs(src + (q + kv) * esz, group, kept, c, kv, dst + c * (q + kv) * esz, kv, esz);
  return out;
}

// In place on each head row (hd contiguous elements) of q and k inside qkv (B*T, width):
// optional RMSNorm with float statistics (as the reference: normalise, round, then weight),
// then rotate-half RoPE, each result rounded once from float.
template <typename scalar_t>
void norm_rope_inplace(at::Tensor& qkv, int64_t T, int64_t q_heads, int64_t k_heads, int64_t hd,
                       const at::Tensor& cos, const at::Tensor& sin, const std::optional<at::Tensor>& q_norm,
                       const std::optional<at::Tensor>& k_norm, double eps) {
  const int64_t BT = qkv.size(0), width = qkv.size(1), half = hd / 2;
  scalar_t* base = qkv.mutable_data_ptr<scalar_t>();
  const scalar_t* cs = cos.const_data_ptr<scalar_t>();
  const scalar_t* sn = sin.const_data_ptr<scalar_t>();
  const scalar_t* qw = q_norm ? q_norm->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* kw = k_norm ? k_norm->const_data_ptr<scalar_t>() : nullptr;
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, BT, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(hd);
    for (int64_t bt = begin; bt < end; ++bt) {
      const scalar_t* ct = cs + (bt % T) * hd;
      const scalar_t* st = sn + (bt % T) * hd;
      for (int64_t h = 0; h < q_heads + k_heads; ++h) {
        scalar_t* row = base + bt * width + h * hd;  // k heads follow the q heads directly
        const scalar_t* w = h < q_heads ? qw : kw;
        if (w != nullptr) {
          float ss = 0.f;
          for (int64_t e = 0; e < hd; ++e) ss += static_cast<float>(row[e]) * static_cast<float>(row[e]);
          const float rstd = 1.f / std::sqrt(ss / static_cast<float>(hd) + feps);
          for (int64_t e = 0; e < hd; ++e)
            buf[e] = static_cast<float>(w[e]) * static_cast<float>(static_cast<scalar_t>(static_cast<float>(row[e]) * rstd));
        } else {
          for (int64_t e = 0; e < hd; ++e) buf[e] = static_cast<float>(row[e]);
        }
        for (int64_t e = 0; e < half; ++e) {
          row[e] = static_cast<scalar_t>(buf[e] * static_cast<float>(ct[e]) - buf[e + half] * static_cast<float>(st[e]));
          row[e + half] = static_cast<scalar_t>(buf[e + half] * static_cast<float>(ct[e + half]) +
                                                buf[e] * static_cast<float>(st[e + half]));
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
  TORCH_CHECK(x.dim() == 4, "masked_attention: x must be (S, B, T, d), got ", x.sizes());
  const int64_t S = x.size(0), B = x.size(1), T = x.size(2), d = x.size(3);
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == T && cos.sizes() == sin.sizes(),
              "masked_attention: cos and sin must be (T=", T, ", hd), got ", cos.sizes(), " and ", sin.sizes());
  const int64_t hd = cos.size(1);
  TORCH_CHECK(hd % 2 == 0, "masked_attention: head_dim ", hd, " must be even for rotate-half RoPE");
  TORCH_CHECK(w_qkv.dim() == 3 && w_qkv.size(2) == d && w_qkv.size(1) % hd == 0 && w_qkv.size(1) / hd >= 3,
              "masked_attention: w_qkv must be (G, (r+2)*hd, d=", d, ") with hd=", hd, ", got ", w_qkv.sizes());
  const int64_t G = w_qkv.size(0), rows = w_qkv.size(1), r = rows / hd - 2;
  TORCH_CHECK(w_o_t.dim() == 3 && w_o_t.size(0) == G && w_o_t.size(1) == r * hd && w_o_t.size(2) == d,
              "masked_attention: w_o_t must be (G=", G, ", r*hd=", r * hd, ", d=", d, "), got ", w_o_t.sizes());
  TORCH_CHECK(!b_qkv || (b_qkv->dim() == 2 && b_qkv->size(0) == G && b_qkv->size(1) == rows),
              "masked_attention: b_qkv must be (G=", G, ", (r+2)*hd=", rows, ")");
  TORCH_CHECK(!q_norm || (q_norm->dim() == 1 && q_norm->size(0) == hd), "masked_attention: q_norm must be (hd=", hd,
              ",)");
  TORCH_CHECK(!k_norm || (k_norm->dim() == 1 && k_norm->size(0) == hd), "masked_attention: k_norm must be (hd=", hd,
              ",)");
  const auto store = x.scalar_type();
  TORCH_CHECK(w_qkv.scalar_type() == store && w_o_t.scalar_type() == store && (!b_qkv || b_qkv->scalar_type() == store),
              "masked_attention: x, w_qkv, w_o_t and b_qkv must share a dtype, got ", store, ", ", w_qkv.scalar_type(),
              ", ", w_o_t.scalar_type());
  TORCH_CHECK(keep_idx.scalar_type() == at::kInt && keep_count.scalar_type() == at::kInt,
              "masked_attention: keep_idx and keep_count must be int32 (use mask_to_index), got ",
              keep_idx.scalar_type(), " and ", keep_count.scalar_type());
  TORCH_CHECK(keep_idx.dim() == 2 && keep_idx.size(0) == S && keep_idx.size(1) == G && keep_count.dim() == 1 &&
                  keep_count.size(0) == S,
              "masked_attention: keep_idx must be (S=", S, ", G=", G, ") and keep_count (S,), got ", keep_idx.sizes(),
              " and ", keep_count.sizes());
  TORCH_CHECK(x.device().is_cpu() && w_qkv.device().is_cpu() && w_o_t.device().is_cpu(),
              "masked_attention: the cpp backend takes CPU tensors only");

  const auto compute = compute_dtype(store);  // see compute_dtype.h
  const auto xs = x.contiguous();
  const auto wqkv = w_qkv.contiguous(), wot = w_o_t.contiguous();
  const auto cs = cos.to(compute).contiguous(), sn = sin.to(compute).contiguous();
  std::optional<at::Tensor> bias, qn, kn;
  if (b_qkv) bias = b_qkv->contiguous();
  if (q_norm) qn = q_norm->to(compute).contiguous();
  if (k_norm) kn = k_norm->to(compute).contiguous();
  const auto idx_all = keep_idx.contiguous(), cnt_all = keep_count.contiguous();
  const int32_t* counts = cnt_all.const_data_ptr<int32_t>();
  const int32_t* indices = idx_all.const_data_ptr<int32_t>();
  const int64_t esz = xs.element_size();
  auto out = at::empty_like(xs);

  for (int64_t s = 0; s < S; ++s) {
    const int64_t c = counts[s];
    TORCH_CHECK(c >= 0 && c <= G, "masked_attention: keep_count[", s, "] = ", c, " is outside [0, G=", G, "]");
    auto dst = out[s].view({B * T, d});
    if (c == 0) {
      dst.zero_();
      continue;
    }
    const int32_t* kept = indices + s * G;
    for (int64_t j = 0; j < c; ++j)
      TORCH_CHECK(kept[j] >= 0 && kept[j] < G, "masked_attention: keep_idx[", s, ", ", j, "] = ", kept[j],
                  " is outside [0, G=", G, ")");
    const int64_t width = c * rows, q_width = c * r * hd;
    const auto w = gather_qkv(wqkv, kept, c, r, hd, d).view({width, d}).to(compute);
    const auto xb = xs[s].view({B * T, d}).to(compute);
    auto qkv = gemm_nt(xb, w, bias ? std::optional<at::Tensor>(gather_qkv(*bias, kept, c, r, hd, 1).to(compute))
                                   : std::nullopt);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "masked_attention_cpu", [&] {
      norm_rope_inplace<scalar_t>(qkv, T, c * r, c, hd, cs, sn, qn, kn, norm_eps);
    });
    const auto q = qkv.narrow(1, 0, q_width).view({B, T, c * r, hd}).transpose(1, 2);
    const auto k = qkv.narrow(1, q_width, c * hd).view({B, T, c, hd}).transpose(1, 2);
    const auto v = qkv.narrow(1, q_width + c * hd, c * hd).view({B, T, c, hd}).transpose(1, 2);
    const auto att = at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, /*is_causal=*/true, scale,
                                                      /*enable_gqa=*/true);
    auto wo = at::empty({c, r * hd, d}, wot.options());
    gather_slabs(static_cast<const char*>(wot.const_data_ptr()), r * hd * d, kept, c, r * hd * d,
                 static_cast<char*>(wo.mutable_data_ptr()), r * hd * d, esz);
    const auto att2d = att.transpose(1, 2).reshape({B * T, q_width});
    gemm_nt_into(dst, att2d, wo.view({q_width, d}).to(compute).t());
  }
  return out;
}

}  // namespace bpp

TORCH_LIBRARY_IMPL(bpp, CPU, m) {
  m.impl("masked_attention", &bpp::masked_attention_cpu);
}
