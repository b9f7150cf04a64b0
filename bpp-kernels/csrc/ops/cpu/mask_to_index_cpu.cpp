// CPU mask -> index list: one pass counts the kept units, a second writes kept indices to the
// front and pruned ones after them, both ascending (the contract of reference.mask_to_index).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace bpp {

std::tuple<at::Tensor, at::Tensor> mask_to_index_cpu(const at::Tensor& mask_in) {
  TORCH_CHECK(mask_in.dim() == 2 && mask_in.scalar_type() == at::kBool,
              "mask_to_index: mask must be a 2-D bool tensor (S, n), got ", mask_in.sizes(), " ",
              mask_in.scalar_type());
  const auto mask = mask_in.contiguous();
  const int64_t S = mask.size(0), n = mask.size(1);
  auto keep_idx = at::empty({S, n}, mask.options().dtype(at::kInt));
  auto keep_count = at::empty({S}, mask.options().dtype(at::kInt));
  const bool* m = mask.data_ptr<bool>();
  int32_t* idx = keep_idx.data_ptr<int32_t>();
  int32_t* cnt = keep_count.data_ptr<int32_t>();
  // Grain ~32k mask entries: a (S, 1536) mask runs on the calling thread, since waking a pool
  // thread (ms on a busy machine) costs more than the whole pass.
  at::parallel_for(0, S, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const bool* row = m + s * n;
      int32_t* out = idx + s * n;
      int32_t kept = 0;
      for (int64_t j = 0; j < n; ++j) kept += row[j];
      int32_t front = 0, back = kept;
      for (int64_t j = 0; j < n; ++j) (row[j] ? out[front++] : out[back++]) = static_cast<int32_t>(j);
      cnt[s] = kept;
    }
  });
  return {keep_idx, keep_count};
}

}  // namespace bpp

TORCH_LIBRARY_IMPL(bpp, CPU, m) {
  m.impl("mask_to_index", &bpp::mask_to_index_cpu);
}
