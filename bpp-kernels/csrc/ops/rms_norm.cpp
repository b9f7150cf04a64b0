// Schemas: RMSNorm over the last dim with fp32 statistics (see bpp_kernels/reference.py), the
// same fused with the residual add before it, and their shared backward.
// rms_norm: y = weight * (x * rstd).to(x.dtype), in the dtype weight and x promote to, then
// converted to out_dtype when given. add_rms_norm: h = x.to(residual.dtype) + residual (in
// residual's dtype), y = rms_norm(h) as above; returns (y, h). The backward recomputes each row's
// statistics from the saved h (x for rms_norm) and weight and returns (dh in h's dtype, dweight
// in weight's dtype; dweight an empty (0,) tensor unless need_weight); grad_h, the gradient that
// reached add_rms_norm's h output directly, is added to dh.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bpp, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, ScalarType? out_dtype=None) "
      "-> (Tensor, Tensor)");
  m.def(
      "rms_norm_backward(Tensor grad_out, Tensor? grad_h, Tensor h, Tensor weight, float eps, bool need_weight) "
      "-> (Tensor, Tensor)");
}
