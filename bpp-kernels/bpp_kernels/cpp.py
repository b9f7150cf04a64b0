"""The C++ CPU backend: thin wrappers over ``torch.ops.bpp.*`` from the extension ``bpp_kernels._C``.

Each function here has the signature of its op in :mod:`bpp_kernels.reference`. Every
differentiable op has a C++ backward op beside its forward (first-order gradients only);
:mod:`bpp_kernels._autograd` registers the pair's fake (meta) implementations and ties them with
:func:`torch.library.register_autograd`, as it does for the Triton backend's ops, so eager
autograd and ``torch.compile`` both see them.

GEMMs: through oneDNN on CPUs with AVX512 (measured faster than ATen's mm there), else mm;
``BPP_CPU_GEMM=onednn|aten|auto`` overrides, ``torch.backends.mkldnn.enabled = False`` turns
oneDNN off, :func:`gemm_library` tells the current choice. The backward ops' gradient GEMMs use
mm (their recomputation of the forward uses the forward's library, so the same bits).

masked_swiglu has two forward ops: ``bpp::masked_swiglu`` (inference) and
``bpp::masked_swiglu_with_gate_up``, run when a gradient is wanted, which also returns the kept
channels' gate and up projections (memory proportional to the kept channels) for the backward to
read instead of recomputing them; both give the same output bits.

Numerics: fp32 runs in fp32. fp16 and bf16 run in their own dtype only on CPUs with native
instructions for them (AVX512-FP16/AMX-FP16, AVX512-BF16/AMX-BF16); elsewhere their GEMMs are
emulated ~20x slower than fp32, so the inputs are computed in fp32 and rounded once at the end
(closer to the fp32 reference than the reference's own half-precision run). Weight gradients
are accumulated in fp32 and rounded once. Samples are computed one after another with the
same calls whatever S is, so a sample's forward result is bit-identical alone or in a batch.
The norms have no GEMM and compute in fp32 whatever the dtype: layer_norm rounds once at the end,
rms_norm and add_rms_norm round where the reference does (h, the normalised value, the weight
product, out_dtype).
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.bpp.*)

    AVAILABLE = True
except ImportError:
    AVAILABLE = False


if AVAILABLE:
    from . import _autograd

    def gemm_library() -> str:
        """``"onednn"`` or ``"mm"``: the library the C++ ops' GEMMs use under the current settings."""
        return torch.ops.bpp.cpu_gemm_library()

    @torch.library.register_fake("bpp::mask_to_index")
    def _mask_to_index_fake(mask):
        S, n = mask.shape
        return mask.new_empty((S, n), dtype=torch.int32), mask.new_empty((S,), dtype=torch.int32)

    _autograd.masked_swiglu(torch.ops.bpp.masked_swiglu.default, torch.ops.bpp.masked_swiglu_backward.default,
                            forward_with_gate_up=torch.ops.bpp.masked_swiglu_with_gate_up.default)
    _autograd.masked_mlp(torch.ops.bpp.masked_mlp.default, torch.ops.bpp.masked_mlp_backward.default)
    _autograd.layer_norm(torch.ops.bpp.layer_norm.default, torch.ops.bpp.layer_norm_backward.default)
    _autograd.rms_norm(torch.ops.bpp.rms_norm.default, torch.ops.bpp.add_rms_norm.default,
                       torch.ops.bpp.rms_norm_backward.default)
    _autograd.masked_attention(torch.ops.bpp.masked_attention.default,
                               torch.ops.bpp.masked_attention_backward.default)
    _autograd.linear_cross_entropy(torch.ops.bpp.linear_cross_entropy.default,
                                   torch.ops.bpp.linear_cross_entropy_backward.default,
                                   backward_takes_chunk_size=False)

    def mask_to_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.bpp.mask_to_index(mask)

    def masked_swiglu(x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale=None, activation="silu"):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, w_gate_up, w_down_t, unit_scale)):
            # a gradient is wanted: keep the kept channels' gate/up projections for the backward
            return torch.ops.bpp.masked_swiglu_with_gate_up(x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale,
                                                            activation)[0]
        return torch.ops.bpp.masked_swiglu(x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale, activation)

    def masked_mlp(x, w_up, w_down_t, keep_idx, keep_count, b_up=None, activation="gelu", unit_scale=None):
        return torch.ops.bpp.masked_mlp(x, w_up, w_down_t, keep_idx, keep_count, b_up, unit_scale, activation)

    def rms_norm(x, weight, eps, out_dtype=None):
        return torch.ops.bpp.rms_norm(x, weight, float(eps), out_dtype)

    def add_rms_norm(x, residual, weight, eps, out_dtype=None):
        return torch.ops.bpp.add_rms_norm(x, residual, weight, float(eps), out_dtype)

    def layer_norm(x, weight, bias, eps):
        return torch.ops.bpp.layer_norm(x, weight, bias, float(eps))

    def masked_attention(x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv=None, q_norm=None, k_norm=None,
                         norm_eps=1e-6, scale=None, unit_scale=None, position_ids=None, attention_mask=None,
                         window=None, head_keep=None):
        scale = cos.shape[-1] ** -0.5 if scale is None else float(scale)
        # window 0: none (the operator's default); position_ids / attention_mask None: positions 0..T-1, no
        # padding; head_keep None: every head of a kept group
        return torch.ops.bpp.masked_attention(x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv, q_norm,
                                              k_norm, unit_scale, float(norm_eps), scale, position_ids,
                                              attention_mask, 0 if window is None else int(window), head_keep)

    def linear_cross_entropy(h, weight, target, ignore_index=-100, chunk_size=4096):
        return torch.ops.bpp.linear_cross_entropy(h, weight, target, int(ignore_index), int(chunk_size))[0]
