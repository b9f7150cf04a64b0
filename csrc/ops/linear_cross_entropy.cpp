// Schema: per-row cross-entropy of h @ weight.T (fp32 loss) without materialising all logits
// (see bpp_kernels/reference.py). chunk_size bounds the rows the reference handles at once; the
// C++ op works in fixed tiles and bounds its memory by itself, so it only checks the value.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bpp, m) {
  m.def("linear_cross_entropy(Tensor h, Tensor weight, Tensor target, int ignore_index, int chunk_size) -> Tensor");
}
