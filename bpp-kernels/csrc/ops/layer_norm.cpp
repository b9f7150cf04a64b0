// Schemas: LayerNorm over the last dim with fp32 statistics (float64 for float64 inputs), as
// torch.nn.functional.layer_norm computes it, and its backward (see bpp_kernels/reference.py).
// The backward recomputes each row's mean and inverse standard deviation from the saved input and
// returns the gradients of x, weight and bias; output_mask says which are wanted, the others come
// back as empty (0,) tensors.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bpp, m) {
  m.def("layer_norm(Tensor x, Tensor weight, Tensor? bias, float eps) -> Tensor");
  m.def(
      "layer_norm_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, float eps, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
}
