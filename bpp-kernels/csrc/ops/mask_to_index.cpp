// Schema: mask (S, n) bool -> keep_idx (S, n) int32 (kept first, ascending, then the pruned
// ones ascending), keep_count (S,) int32.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bpp, m) {
  m.def("mask_to_index(Tensor mask) -> (Tensor keep_idx, Tensor keep_count)");
}
