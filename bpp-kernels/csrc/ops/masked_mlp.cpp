// Schemas: per-sample non-gated MLP (OPT, GPT-2, Pythia) over kept channels only, and its
// backward (see bpp_kernels/reference.py): y = sum over kept j of a_j * act(x W_up[j] + b_up[j])
// W_down^T[j], without the down projection's bias. activation is "gelu" (erf), "gelu_tanh" or
// "relu"; unit_scale (S, m), aligned with keep_idx, scales the j-th kept channel's activation;
// None is a hard mask. The backward recomputes the kept channels' up projections (nothing but the
// inputs is saved) and returns, in order, the gradients of x, w_up, w_down_t, b_up and unit_scale;
// output_mask says which are wanted, the others come back as empty (0,) tensors.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bpp, m) {
  m.def(
      "masked_mlp(Tensor x, Tensor w_up, Tensor w_down_t, Tensor keep_idx, Tensor keep_count, Tensor? b_up, "
      "Tensor? unit_scale, str activation) -> Tensor");
  m.def(
      "masked_mlp_backward(Tensor grad_out, Tensor x, Tensor w_up, Tensor w_down_t, Tensor keep_idx, "
      "Tensor keep_count, Tensor? b_up, Tensor? unit_scale, str activation, bool[5] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}
