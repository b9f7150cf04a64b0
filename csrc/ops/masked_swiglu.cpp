// Schema: per-sample SwiGLU MLP over kept channels only (see bpp_kernels/reference.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bpp, m) {
  m.def("masked_swiglu(Tensor x, Tensor w_gate_up, Tensor w_down_t, Tensor keep_idx, Tensor keep_count) -> Tensor");
}
