// Grain sizes for at::parallel_for in the CPU ops: a parallel region is only opened for at least
// ~32k elements of work per task, since waking the thread pool costs milliseconds on a busy
// machine, more than a small pass itself (the rule mask_to_index_cpu.cpp already follows).
#pragma once

#include <algorithm>
#include <cstdint>

namespace bpp {

constexpr int64_t kMinParallelWork = int64_t{1} << 15;

// Items per task when each item is work_per_item elements of work (at least at_least items).
inline int64_t grain_for(int64_t work_per_item, int64_t at_least = 1) {
  return std::max(at_least, kMinParallelWork / std::max<int64_t>(work_per_item, 1));
}

}  // namespace bpp
