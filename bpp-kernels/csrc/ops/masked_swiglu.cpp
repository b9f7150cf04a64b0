// Schemas: per-sample gated MLP over kept channels only, and its backward (see
// bpp_kernels/reference.py). unit_scale (S, m), aligned with keep_idx, scales the j-th kept
// channel's activation; None is a hard mask. activation names the gate's nonlinearity: "silu"
// (SwiGLU) or "gelu_tanh" (GeGLU, tanh-approximated GELU).
// masked_swiglu_with_gate_up is the same forward (the same bits) that also returns the kept
// channels' gate and up projections, every sample's (N, 2c) [G | U] flat in sample order, in x's
// dtype: what autograd saves for the backward when a gradient is wanted (memory proportional to
// the kept channels), so the backward does not recompute them. The backward takes them as
// gate_up (None: it recomputes them) and returns, in order, the gradients of x, w_gate_up,
// w_down_t and unit_scale; output_mask says which are wanted, the others come back as empty (0,)
// tensors.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bpp, m) {
  m.def(
      "masked_swiglu(Tensor x, Tensor w_gate_up, Tensor w_down_t, Tensor keep_idx, Tensor keep_count, "
      "Tensor? unit_scale, str activation=\"silu\") -> Tensor");
  m.def(
      "masked_swiglu_with_gate_up(Tensor x, Tensor w_gate_up, Tensor w_down_t, Tensor keep_idx, Tensor keep_count, "
      "Tensor? unit_scale, str activation=\"silu\") -> (Tensor, Tensor)");
  m.def(
      "masked_swiglu_backward(Tensor grad_out, Tensor x, Tensor w_gate_up, Tensor w_down_t, Tensor keep_idx, "
      "Tensor keep_count, Tensor? unit_scale, Tensor? gate_up, str activation, bool[4] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
}
