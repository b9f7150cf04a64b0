// CPU masked SwiGLU. Per sample s with c kept channels:
//   1. copy the kept rows of the interleaved gate/up weight into one (2c, d) block, gate rows
//      first, then up rows (plain memcpy per row: ATen's index_select copies slice by slice
//      and measured ~20x slower than the GEMM input it produces needs);
//   2. one GEMM gives gate and up side by side, (N, 2c) = [G | U];
//   3. SiLU in place on G, then G *= U: two vectorised ATen passes over contiguous rows
//      (the interleaved layout would make both strided); G is then the (N, c) activation, read
//      by the next GEMM through its row stride 2c, no copy;
//   4. one GEMM against the gathered rows of W_down^T, written straight into out[s].
// fp16/bf16 are computed in fp32 on CPUs without native half-precision GEMMs (compute_dtype.h).
// Batch invariance: samples run one after another, each with the same calls and the same
// thread count whatever S is, so sample j's bits never depend on its batch companions.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "compute_dtype.h"
#include "gemm.h"

#include <cstring>

namespace bpp {
namespace {

// dst row j (width elements, dst_stride apart) = src row idx[j] (src_stride apart), j < c.
void gather_rows(const char* src, int64_t src_stride, const int32_t* idx, int64_t c, int64_t width, char* dst,
                 int64_t dst_stride, int64_t elem_size) {
  // One thread on purpose: a few MB of memcpy is memory-bound, and on a busy machine waking the
  // pool for it measured slower (ms per parallel region) than the copy itself.
  for (int64_t j = 0; j < c; ++j)
    std::memcpy(dst + j * dst_stride * elem_size, src + idx[j] * src_stride * elem_size, width * elem_size);
}

}  // namespace

at::Tensor masked_swiglu_cpu(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down_t,
                             const at::Tensor& keep_idx, const at::Tensor& keep_count) {
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
  TORCH_CHECK(x.device().is_cpu() && w_gate_up.device().is_cpu() && w_down_t.device().is_cpu(),
              "masked_swiglu: the cpp backend takes CPU tensors only");

  const auto xs = x.reshape({S, -1, d}).contiguous();
  const auto wgu = w_gate_up.contiguous(), wdt = w_down_t.contiguous();
  const auto idx_all = keep_idx.contiguous(), cnt_all = keep_count.contiguous();
  const int32_t* counts = cnt_all.const_data_ptr<int32_t>();
  const int32_t* indices = idx_all.const_data_ptr<int32_t>();
  const auto store = xs.scalar_type();
  const auto compute = compute_dtype(store);  // see compute_dtype.h
  const int64_t elem = xs.element_size();
  auto out = at::empty_like(xs);

  for (int64_t s = 0; s < S; ++s) {
    const int64_t c = counts[s];
    TORCH_CHECK(c >= 0 && c <= m, "masked_swiglu: keep_count[", s, "] = ", c, " is outside [0, m=", m, "]");
    auto dst = out[s];  // (N, d)
    if (c == 0) {
      dst.zero_();
      continue;
    }
    const int32_t* kept = indices + s * m;
    for (int64_t j = 0; j < c; ++j)
      TORCH_CHECK(kept[j] >= 0 && kept[j] < m, "masked_swiglu: keep_idx[", s, ", ", j, "] = ", kept[j],
                  " is outside [0, m=", m, ")");
    auto w = at::empty({2 * c, d}, wgu.options());  // gate rows, then up rows
    const char* wsrc = static_cast<const char*>(wgu.const_data_ptr());
    char* wdst = static_cast<char*>(w.mutable_data_ptr());
    gather_rows(wsrc, 2 * d, kept, c, d, wdst, d, elem);
    gather_rows(wsrc + d * elem, 2 * d, kept, c, d, wdst + c * d * elem, d, elem);
    auto wd = at::empty({c, d}, wdt.options());
    gather_rows(static_cast<const char*>(wdt.const_data_ptr()), d, kept, c, d,
                static_cast<char*>(wd.mutable_data_ptr()), d, elem);

    const auto xc = xs[s].to(compute);
    auto gate_up = gemm_nt(xc, w.to(compute));  // (N, 2c) = [gate | up]
    auto act = gate_up.narrow(1, 0, c);
    at::silu_(act);
    act.mul_(gate_up.narrow(1, c, c));
    gemm_nt_into(dst, act, wd.to(compute).t());
  }
  return out.view(x.sizes());
}

}  // namespace bpp

TORCH_LIBRARY_IMPL(bpp, CPU, m) {
  m.impl("masked_swiglu", &bpp::masked_swiglu_cpu);
}
