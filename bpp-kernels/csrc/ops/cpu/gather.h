// Row gathers and scatter-adds for the CPU ops: a kept unit's weights are whole contiguous rows
// (or slabs), so a gather is one memcpy per unit and a weight-gradient update one vectorisable
// loop per unit; nothing touches the rows of pruned units.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "parallel.h"

#include <cstdint>
#include <cstring>

namespace bpp {

// dst row j (width elements, dst_stride apart) = src row idx[j] (src_stride apart), j < c.
// One thread on purpose: a few MB of memcpy is memory-bound, and on a busy machine waking the
// pool for it measured slower (ms per parallel region) than the copy itself.
inline void gather_rows(const char* src, int64_t src_stride, const int32_t* idx, int64_t c, int64_t width, char* dst,
                        int64_t dst_stride, int64_t elem_size) {
  for (int64_t j = 0; j < c; ++j)
    std::memcpy(dst + j * dst_stride * elem_size, src + idx[j] * src_stride * elem_size, width * elem_size);
}

// acc (float) row idx[j] (acc_stride apart) += src row j (src_stride apart), width elements,
// j < c. The kept units of one sample are distinct, so rows never collide inside a call.
inline void scatter_add_rows(float* acc, int64_t acc_stride, const int32_t* idx, int64_t c, int64_t width,
                             const at::Tensor& src_float, int64_t src_stride) {
  const float* src = src_float.const_data_ptr<float>();
  at::parallel_for(0, c, grain_for(width), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      float* a = acc + idx[j] * acc_stride;
      const float* b = src + j * src_stride;
      for (int64_t e = 0; e < width; ++e) a[e] += b[e];
    }
  });
}

}  // namespace bpp
