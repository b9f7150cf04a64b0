"""bpp_kernels: transformer layers under many structured masks at once, forward and backward.

A standalone library for structured-sparsity research, the distribution ``bpp-kernels``
(``pip install --no-build-isolation .`` in its folder, against the torch already installed): it
depends on torch (and triton for the GPU path), never on bpp or transformers. Every op takes S masks in one call, computes (and
differentiates) only the units each mask keeps, and never reads the weights of pruned units.

Quick start::

    import torch, bpp_kernels as K
    w_gate_up, w_down_t = K.pack_swiglu(w_gate, w_up, w_down)   # once, from (m, d), (m, d), (d, m)
    keep_idx, keep_count = K.mask_to_index(mask)                 # mask (S, m) bool
    y = K.masked_swiglu(x, w_gate_up, w_down_t, keep_idx, keep_count)   # x (S, B, T, d)
    y.sum().backward()                                           # gradients of x and both weights

Layouts (built once with :func:`pack_swiglu` / :func:`pack_mlp` / :func:`pack_attention`; any
Hugging Face Llama, Mistral, Qwen2/3-style weights, and OPT, GPT-2, Pythia-style MLPs): a unit's
weights are whole rows, so keeping a unit is a row gather.

- MLP, m channels: ``w_gate_up (m, 2, d)`` (row j holds W_gate[j] and W_up[j]) and
  ``w_down_t (m, d)`` (W_down transposed).
- Non-gated MLP (OPT, GPT-2, Pythia), m channels: ``w_up (m, d)``, ``b_up (m,)`` or None and
  ``w_down_t (m, d)``; the down projection's bias stays with the caller.
- Attention, G KV groups of r query heads of size hd: ``w_qkv (G, (r+2)*hd, d)`` (the group's
  r query heads, then its key head, then its value head), ``w_o_t (G, r*hd, d)`` (the columns of
  W_o that read the group's heads, transposed), optional ``b_qkv (G, (r+2)*hd)``. Query head h
  belongs to group h // r, as in Hugging Face's ``repeat_kv``. The unit of attention masks is
  the KV group (for MHA, one head).

Mask formats:

- ``keep_idx (S, n) int32, keep_count (S,) int32``: per sample a permutation of the n units
  with the kept ones first, ascending; :func:`mask_to_index` builds it from a bool ``(S, n)``
  mask on the mask's device without a host sync. Counts live on the device: nothing syncs.
- ``unit_scale (S, n)`` floating, optional (``masked_swiglu``, ``masked_mlp``,
  ``masked_attention``): a soft mask's values for the kept units, aligned with keep_idx:
  ``unit_scale[s, j]`` scales unit ``keep_idx[s, j]`` for ``j < keep_count[s]`` (an MLP
  channel's activation before W_down; a KV group's attention output, all r heads, before W_o);
  entries past keep_count are never read and get zero gradient. From unit-ordered gates ``z (S, n)`` (hard-concrete, sigmoid, ...)::

      keep_idx, keep_count = K.mask_to_index(z > 0)
      unit_scale = z.gather(1, keep_idx.long())          # differentiable back to z

  Units with z == 0 are skipped entirely. ``unit_scale=None`` is the hard-mask fast path.
- ``head_keep (S, G, r) bool``, optional (``masked_attention``): query heads pruned inside KV
  groups (Minitron, LLM-Pruner; Llama 3 has 4 query heads per group, Gemma 3 270M one group of 4),
  indexed by the original group g and head j of the group: head j of g contributes to sample s
  only if g is kept (keep_idx / keep_count) and ``head_keep[s, g, j]``. A pruned head's output is
  zero before W_o, so its q rows and W_o rows get zero gradient (its group's k/v rows too when
  the group keeps no head); the C++ and Triton backends skip its work. From a mask over the H
  query heads in Hugging Face's order: ``head_keep = head_mask.view(S, G, r)``. None keeps every
  head of every kept group.

Ops (all in :mod:`bpp_kernels.ops`; shapes and dtypes in each docstring):

=======================  ====================================================  ==================
op                       computes                                              differentiable in
=======================  ====================================================  ==================
mask_to_index            bool mask -> keep_idx, keep_count                     (integer outputs)
rms_norm / add_rms_norm  RMSNorm (fp32 statistics), optionally after h = x+r   x, residual, weight
layer_norm               LayerNorm (fp32 statistics and affine map)            x, weight, bias
masked_swiglu            per sample: down(a * act(gate x) * up x), kept        x, w_gate_up,
                         channels only; act silu (SwiGLU) or gelu_tanh         w_down_t, unit_scale
                         (GeGLU)
masked_mlp               per sample: down(a * act(up x + b_up)), kept          x, w_up, w_down_t,
                         channels only; act gelu, gelu_tanh or relu            b_up, unit_scale
masked_attention         per sample: causal GQA attention of the kept groups   x, w_qkv, w_o_t,
                         (q/k/v bias, q/k RMSNorm, RoPE fused), through W_o;   b_qkv, q_norm, k_norm,
                         optional position_ids, key padding mask, sliding      unit_scale
                         window, kept query heads inside groups (head_keep)
linear_cross_entropy     per-row CE of h @ W.T, fp32, no (N, V) logits         h, weight
=======================  ====================================================  ==================

Gradients: first order, on every backend, through plain ``loss.backward()`` or
``torch.autograd.grad``; cos/sin (RoPE tables), keep_idx and keep_count are constants. Weight
gradients of units no sample keeps are exactly zero and those weights are never read. The C++
and Triton backward passes save only the inputs and recompute what they need (the kept units'
projections, the attention with its log-sum-exp, the logits tile by tile), so training memory
does not grow with pruned work; the one exception, C++ ``masked_swiglu``, also saves the kept
channels' gate and up projections when a gradient is wanted (memory proportional to the kept
channels) rather than recompute them. Both directions are ``torch.library`` ops with fake
implementations and ``register_autograd``: ``torch.compile(fullgraph=True)`` traces a masked
forward and backward without graph breaks (the reference backend's Python loop does break).

Backends (:mod:`bpp_kernels.ops`): ``cpp`` (the C++ extension, CPU tensors), ``triton`` (CUDA
tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and ``reference`` (plain PyTorch, the
ground truth every test compares against). Chosen per call (``backend=``), else by
``BPP_KERNELS_BACKEND`` in {auto, reference, cpp, triton}; ``auto``: triton on CUDA, cpp on CPU
when built, else reference. :func:`backend_info` says what runs where.

Dtypes: fp32, fp16 and bf16 on every backend (the C++ backend computes fp16/bf16 in fp32 on CPUs
without native half-precision GEMMs; Triton accumulates in fp32); float64 runs on the reference,
in float64 (naming another backend for it is an error). cos/sin may be any floating dtype and are
cast to x's dtype (:func:`rope_tables` builds them). rms_norm and add_rms_norm take
``out_dtype`` (the normed output's dtype, converted in the same pass), and add_rms_norm takes x and
residual of different dtypes (h in residual's): a bf16 computation on an fp32 residual stream is
``y16, h32 = add_rms_norm(a16, h32, w32, eps, out_dtype=torch.bfloat16)``. Losses are fp32;
gradients come back in their input's dtype; a batch that keeps no unit gives zero gradients.

Indices: every masked op checks keep_idx / keep_count first (:func:`check_indices`: counts in
[0, n]; the kept entries in [0, n) and distinct): a ValueError on CPU, a device-side assertion on
CUDA and under torch.compile, never a crash or silent garbage. ``check=False`` skips it for
indices from :func:`mask_to_index`. fp32 matches the reference to 1e-5 relative RMS error; fp16/bf16
err at most twice as much as the reference run in that dtype (FlashAttention's rule).

Determinism: a sample's forward result does not depend on the other samples of its batch (no
split-K across samples, no atomics, no batch-size-dependent tiles); weight gradients are summed
over samples in a fixed order.

Examples (run by tests/kernels/test_examples.py): ``examples/hard_concrete_masks.py`` learns
hard-concrete channel and head masks with an L0 penalty on a tiny Llama built from these ops;
``examples/supernet_mlp.py`` trains one shared MLP under S sampled masks per batch.
"""
import os as _os

# The C++ ops' GEMMs go through oneDNN, which keeps the kernels it compiles for each GEMM shape in
# a cache of 1,024 shapes unless ONEDNN_PRIMITIVE_CACHE_CAPACITY says otherwise. Per-sample masks
# make per-sample shapes: one pass of S masks over L layers runs ~5·S·L GEMMs of shapes that change
# with the masks (1,344 for S = 8 over 30 layers), so a cache of 1,024 recompiles nearly every
# GEMM of every pass. oneDNN reads the variable once, when it makes its first kernel, so it is set
# here, on import, unless the caller set it (or its older name, DNNL_PRIMITIVE_CACHE_CAPACITY).
if not {"ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"} & set(_os.environ):
    _os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "16384"

from .layout import pack_attention, pack_mlp, pack_swiglu  # noqa: E402
from .rope import rope_tables  # noqa: E402
from .ops import (  # noqa: E402
    BACKENDS,
    add_rms_norm,
    backend_info,
    check_indices,
    layer_norm,
    linear_cross_entropy,
    mask_to_index,
    masked_attention,
    masked_mlp,
    masked_swiglu,
    rms_norm,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "add_rms_norm",
    "backend_info",
    "check_indices",
    "layer_norm",
    "linear_cross_entropy",
    "mask_to_index",
    "masked_attention",
    "masked_mlp",
    "masked_swiglu",
    "pack_attention",
    "pack_mlp",
    "pack_swiglu",
    "rms_norm",
    "rope_tables",
]
