// Schemas: per-sample causal GQA attention over kept KV groups only, through W_o (see
// bpp_kernels/reference.py for the packed layouts), and its backward. unit_scale (S, G), aligned
// with keep_idx, scales the kept groups' attention outputs; scale is the softmax scale. The
// backward recomputes the projections and the attention (only the inputs are saved) and returns
// the gradients of x, w_qkv, w_o_t, b_qkv, q_norm, k_norm and unit_scale; output_mask says which
// are wanted (absent optional inputs are never wanted), the others come back as empty (0,) tensors.
// cos and sin are constants (no gradient). position_ids (B, T) int64/int32 pick the cos/sin row of
// each token (None: row t; cos/sin then have at least T rows); attention_mask (B, T) bool masks
// keys (False: never attended); window > 0 lets query t see key s only if t - s < window (0: no
// window). A query row that sees no key gets zeros. The defaults are the plain causal attention.
// head_keep (S, G, r) bool, indexed by the original group and head: a kept group's query head j
// contributes to sample s only where head_keep[s, g, j] (None: all of them).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bpp, m) {
  m.def(
      "masked_attention(Tensor x, Tensor w_qkv, Tensor w_o_t, Tensor cos, Tensor sin, Tensor keep_idx, "
      "Tensor keep_count, Tensor? b_qkv, Tensor? q_norm, Tensor? k_norm, Tensor? unit_scale, float norm_eps, "
      "float scale, Tensor? position_ids=None, Tensor? attention_mask=None, int window=0, Tensor? head_keep=None) "
      "-> Tensor");
  m.def(
      "masked_attention_backward(Tensor grad_out, Tensor x, Tensor w_qkv, Tensor w_o_t, Tensor cos, Tensor sin, "
      "Tensor keep_idx, Tensor keep_count, Tensor? b_qkv, Tensor? q_norm, Tensor? k_norm, Tensor? unit_scale, "
      "float norm_eps, float scale, Tensor? position_ids, Tensor? attention_mask, int window, Tensor? head_keep, "
      "bool[7] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
