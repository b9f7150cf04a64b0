// Schema: per-sample causal GQA attention over kept KV groups only, through W_o (see
// bpp_kernels/reference.py for the packed layouts).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bpp, m) {
  m.def(
      "masked_attention(Tensor x, Tensor w_qkv, Tensor w_o_t, Tensor cos, Tensor sin, Tensor keep_idx, "
      "Tensor keep_count, Tensor? b_qkv, Tensor? q_norm, Tensor? k_norm, float norm_eps, float scale) -> Tensor");
}
