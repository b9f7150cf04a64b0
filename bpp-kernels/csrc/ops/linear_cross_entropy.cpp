// Schemas: per-row cross-entropy of h @ weight.T (fp32 loss) without materialising all logits
// (see bpp_kernels/reference.py), returned with every row's log-sum-exp (fp32; ignored rows
// included), and its backward. chunk_size bounds the rows the reference handles at once; the C++
// op works in fixed tiles and bounds its memory by itself, so it only checks the value. The
// backward takes the gradients of both outputs and returns those of h and weight (output_mask
// says which are wanted; the others come back as empty (0,) tensors).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bpp, m) {
  m.def(
      "linear_cross_entropy(Tensor h, Tensor weight, Tensor target, int ignore_index, int chunk_size) -> "
      "(Tensor loss, Tensor lse)");
  m.def(
      "linear_cross_entropy_backward(Tensor grad_loss, Tensor grad_lse, Tensor h, Tensor weight, Tensor target, "
      "Tensor lse, int ignore_index, bool[2] output_mask) -> (Tensor, Tensor)");
}
