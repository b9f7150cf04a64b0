"""The C++ CPU backend: thin wrappers over ``torch.ops.bpp.*`` from the extension ``bpp_kernels._C``.

Each function here has the signature of its op in :mod:`bpp_kernels.reference`. Fake (meta)
implementations are registered so ``torch.compile`` can trace through the ops, and every
differentiable op has its backward registered with :func:`torch.library.register_autograd`
(a C++ backward op beside each forward; first-order gradients only): eager autograd and
``torch.compile`` both see them.

GEMMs: through oneDNN on CPUs with AVX512 (measured faster than ATen's mm there), else mm;
``BPP_CPU_GEMM=onednn|aten|auto`` overrides, ``torch.backends.mkldnn.enabled = False`` turns
oneDNN off, :func:`gemm_library` tells the current choice. The backward ops' gradient GEMMs use
mm (their recomputation of the forward uses the forward's library, so the same bits).

Numerics: fp32 runs in fp32. fp16 and bf16 run in their own dtype only on CPUs with native
instructions for them (AVX512-FP16/AMX-FP16, AVX512-BF16/AMX-BF16); elsewhere their GEMMs are
emulated ~20x slower than fp32, so the inputs are computed in fp32 and rounded once at the end
(closer to the fp32 reference than the reference's own half-precision run). Weight gradients
are accumulated in fp32 and rounded once. Samples are computed one after another with the
same calls whatever S is, so a sample's forward result is bit-identical alone or in a batch.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.bpp.*)

    AVAILABLE = True
except ImportError:
    AVAILABLE = False


def _grad_or_none(grad: torch.Tensor, wanted: bool) -> torch.Tensor | None:
    return grad if wanted else None


if AVAILABLE:

    def gemm_library() -> str:
        """``"onednn"`` or ``"mm"``: the library the C++ ops' GEMMs use under the current settings."""
        return torch.ops.bpp.cpu_gemm_library()

    def _empty_unless(wanted: bool, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return like.new_empty(like.shape if wanted else (0,), dtype=dtype or like.dtype)

    # --- mask_to_index -----------------------------------------------------------------------

    @torch.library.register_fake("bpp::mask_to_index")
    def _mask_to_index_fake(mask):
        S, n = mask.shape
        return mask.new_empty((S, n), dtype=torch.int32), mask.new_empty((S,), dtype=torch.int32)

    def mask_to_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.bpp.mask_to_index(mask)

    # --- masked_swiglu -----------------------------------------------------------------------

    @torch.library.register_fake("bpp::masked_swiglu")
    def _masked_swiglu_fake(x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale):
        return torch.empty_like(x)

    @torch.library.register_fake("bpp::masked_swiglu_backward")
    def _masked_swiglu_backward_fake(grad_out, x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale,
                                     output_mask):
        scale = unit_scale if unit_scale is not None else x.new_empty(0)
        return (_empty_unless(output_mask[0], x), _empty_unless(output_mask[1], w_gate_up),
                _empty_unless(output_mask[2], w_down_t), _empty_unless(output_mask[3] and unit_scale is not None, scale))

    def _masked_swiglu_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _masked_swiglu_backward(ctx, grad):
        x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        wanted = [need[0], need[1], need[2], unit_scale is not None and need[5]]
        grads = torch.ops.bpp.masked_swiglu_backward(grad, x, w_gate_up, w_down_t, keep_idx, keep_count,
                                                     unit_scale, wanted)
        dx, dwgu, dwdt, dscale = (_grad_or_none(g, w) for g, w in zip(grads, wanted))
        return dx, dwgu, dwdt, None, None, dscale

    torch.library.register_autograd("bpp::masked_swiglu", _masked_swiglu_backward, setup_context=_masked_swiglu_setup)

    def masked_swiglu(x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale=None):
        return torch.ops.bpp.masked_swiglu(x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale)

    # --- masked_attention --------------------------------------------------------------------

    @torch.library.register_fake("bpp::masked_attention")
    def _masked_attention_fake(x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv, q_norm, k_norm, unit_scale,
                               norm_eps, scale):
        return torch.empty_like(x)

    @torch.library.register_fake("bpp::masked_attention_backward")
    def _masked_attention_backward_fake(grad_out, x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv, q_norm,
                                        k_norm, unit_scale, norm_eps, scale, output_mask):
        out = [_empty_unless(output_mask[0], x), _empty_unless(output_mask[1], w_qkv),
               _empty_unless(output_mask[2], w_o_t)]
        for wanted, t in zip(output_mask[3:], (b_qkv, q_norm, k_norm, unit_scale)):
            out.append(_empty_unless(bool(wanted) and t is not None, t if t is not None else x))
        return tuple(out)

    def _masked_attention_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:11])
        ctx.norm_eps, ctx.scale = inputs[11], inputs[12]

    def _masked_attention_backward(ctx, grad):
        x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv, q_norm, k_norm, unit_scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        wanted = [need[0], need[1], need[2]] + [t is not None and need[i]
                                                for i, t in ((7, b_qkv), (8, q_norm), (9, k_norm), (10, unit_scale))]
        grads = torch.ops.bpp.masked_attention_backward(grad, x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv,
                                                        q_norm, k_norm, unit_scale, ctx.norm_eps, ctx.scale, wanted)
        dx, dwqkv, dwo, db, dqn, dkn, dscale = (_grad_or_none(g, w) for g, w in zip(grads, wanted))
        return dx, dwqkv, dwo, None, None, None, None, db, dqn, dkn, dscale, None, None

    torch.library.register_autograd("bpp::masked_attention", _masked_attention_backward,
                                    setup_context=_masked_attention_setup)

    def masked_attention(x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv=None, q_norm=None, k_norm=None,
                         norm_eps=1e-6, scale=None, unit_scale=None):
        scale = cos.shape[-1] ** -0.5 if scale is None else float(scale)
        return torch.ops.bpp.masked_attention(x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv, q_norm,
                                              k_norm, unit_scale, float(norm_eps), scale)

    # --- linear_cross_entropy ----------------------------------------------------------------

    @torch.library.register_fake("bpp::linear_cross_entropy")
    def _linear_cross_entropy_fake(h, weight, target, ignore_index, chunk_size):
        return h.new_empty((h.shape[0],), dtype=torch.float32), h.new_empty((h.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("bpp::linear_cross_entropy_backward")
    def _linear_cross_entropy_backward_fake(grad_loss, grad_lse, h, weight, target, lse, ignore_index, output_mask):
        return _empty_unless(output_mask[0], h), _empty_unless(output_mask[1], weight)

    def _linear_cross_entropy_setup(ctx, inputs, output):
        h, weight, target = inputs[:3]
        ctx.save_for_backward(h, weight, target, output[1])
        ctx.ignore_index = inputs[3]

    def _linear_cross_entropy_backward(ctx, grad_loss, grad_lse):
        h, weight, target, lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        wanted = [need[0], need[1]]
        grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        dh, dw = torch.ops.bpp.linear_cross_entropy_backward(grad_loss, grad_lse, h, weight, target, lse,
                                                             ctx.ignore_index, wanted)
        return _grad_or_none(dh, wanted[0]), _grad_or_none(dw, wanted[1]), None, None, None

    torch.library.register_autograd("bpp::linear_cross_entropy", _linear_cross_entropy_backward,
                                    setup_context=_linear_cross_entropy_setup)

    def linear_cross_entropy(h, weight, target, ignore_index=-100, chunk_size=4096):
        return torch.ops.bpp.linear_cross_entropy(h, weight, target, int(ignore_index), int(chunk_size))[0]
