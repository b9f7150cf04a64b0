// CPU masked SwiGLU: per sample, gather the kept rows of the interleaved gate/up weight into one
// (2c, d) block, one GEMM for gate and up together, SiLU(g)*u fused into a single pass over the
// GEMM output (written straight into the (N, c) activation), then one GEMM against the gathered
// rows of W_down^T. GEMMs use ATen's BLAS (threaded); the fused epilogue is parallel over rows.
// Each sample is computed alone with the same calls whatever S is: batch invariant.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>

namespace bpp {
namespace {

template <typename scalar_t>
void silu_mul_rows(const at::Tensor& gate_up, at::Tensor& act, int64_t rows, int64_t c) {
  // gate_up (rows, c, 2) contiguous -> act (rows, c); math in float, as ATen's silu does for half types
  const scalar_t* gu = gate_up.const_data_ptr<scalar_t>();
  scalar_t* out = act.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* src = gu + i * 2 * c;
      scalar_t* dst = out + i * c;
      for (int64_t j = 0; j < c; ++j) {
        const float g = static_cast<float>(src[2 * j]);
        const float u = static_cast<float>(src[2 * j + 1]);
        // round SiLU to the storage type before the product, like silu(g) * u in ATen
        const scalar_t s = static_cast<scalar_t>(g / (1.0f + std::exp(-g)));
        dst[j] = static_cast<scalar_t>(static_cast<float>(s) * u);
      }
    }
  });
}

}  // namespace

at::Tensor masked_swiglu_cpu(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down_t,
                             const at::Tensor& keep_idx, const at::Tensor& keep_count) {
  TORCH_CHECK(x.dim() >= 2, "masked_swiglu: x must be (S, ..., d)");
  TORCH_CHECK(w_gate_up.dim() == 3 && w_gate_up.size(1) == 2, "masked_swiglu: w_gate_up must be (m, 2, d)");
  TORCH_CHECK(keep_idx.scalar_type() == at::kInt && keep_count.scalar_type() == at::kInt,
              "masked_swiglu: keep_idx and keep_count must be int32");
  const int64_t S = x.size(0), d = x.size(-1);
  const auto xs = x.reshape({S, -1, d}).contiguous();
  const int64_t N = xs.size(1);
  auto out = at::zeros_like(xs);
  const auto counts = keep_count.contiguous();
  const int32_t* count = counts.const_data_ptr<int32_t>();
  const auto wgu = w_gate_up.contiguous();
  const auto wdt = w_down_t.contiguous();
  for (const auto s : c10::irange(S)) {
    const int64_t c = count[s];
    if (c == 0) continue;
    const auto kept = keep_idx[s].narrow(0, 0, c).to(at::kLong);
    const auto w = wgu.index_select(0, kept).view({2 * c, d});  // rows g0, u0, g1, u1, ...
    const auto gate_up = at::mm(xs[s], w.t());                  // (N, 2c) = (N, c, 2)
    auto act = at::empty({N, c}, xs.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "masked_swiglu_cpu", [&] {
      silu_mul_rows<scalar_t>(gate_up, act, N, c);
    });
    auto dst = out[s];
    at::mm_out(dst, act, wdt.index_select(0, kept));
  }
  return out.view(x.sizes());
}

}  // namespace bpp

TORCH_LIBRARY_IMPL(bpp, CPU, m) {
  m.impl("masked_swiglu", &bpp::masked_swiglu_cpu);
}
