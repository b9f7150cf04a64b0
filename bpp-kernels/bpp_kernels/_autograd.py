"""The differentiable wiring of every op, declared once for all backends.

A backend implements a differentiable op as two ``torch.library`` operators: the forward, and a
backward operator that recomputes what it needs from the saved inputs (or, for the C++
``masked_swiglu``, reads what a second forward operator returned for it) and returns one tensor
per differentiable input (an empty ``(0,)`` tensor where its ``output_mask`` says that gradient
is not wanted; first order only). A backend passes its two operators (an ``OpOverload`` such as
``torch.ops.bpp.masked_swiglu.default``, or a ``torch.library.custom_op``) to the function named
after the op, which registers on them

- the fake (meta) implementations of both, so ``torch.compile`` traces them without running them;
- ``register_autograd``: what the forward saves, which gradients the backward operator is asked
  for, and how its outputs become the inputs' gradients (None where not wanted).

The C++ backend (:mod:`bpp_kernels.cpp`) and the Triton one (:mod:`bpp_kernels.triton`) differ
only in the operators they pass.
"""
from __future__ import annotations

import torch


def _empty_unless(wanted: bool, like: torch.Tensor) -> torch.Tensor:
    """The fake of one backward output: shaped like ``like`` when wanted, else an empty (0,) one."""
    return like.new_empty(like.shape if wanted else (0,))


def _grads_or_none(grads, wanted):
    return tuple(g if w else None for g, w in zip(grads, wanted))


def masked_swiglu(forward, backward, *, forward_with_gate_up=None) -> None:
    """``forward(x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale, activation) -> y``;
    ``backward(grad, <the six tensor inputs>, [gate_up,] activation, output_mask[4]) -> (dx,
    dw_gate_up, dw_down_t, dunit_scale)`` (activation: "silu" or "gelu_tanh", no gradient; the
    dispatcher may leave out a default one).

    ``forward_with_gate_up`` (C++): the same forward, ``-> (y, gate_up)``, that also returns the kept
    channels' gate and up projections (flat, its length data-dependent), which autograd saves and the
    backward reads instead of recomputing them. With it, the backward takes ``gate_up`` (None after
    the plain ``forward``: it recomputes them)."""
    takes_gate_up = forward_with_gate_up is not None

    def forward_fake(x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale, activation="silu"):
        return torch.empty_like(x)

    def forward_with_gate_up_fake(x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale, activation="silu"):
        return torch.empty_like(x), x.new_empty((torch.library.get_ctx().new_dynamic_size(),))

    def backward_fake(grad_out, x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale, *gate_up_activation_mask):
        output_mask = gate_up_activation_mask[-1]
        scale = unit_scale if unit_scale is not None else x.new_empty(0)
        return (_empty_unless(output_mask[0], x), _empty_unless(output_mask[1], w_gate_up),
                _empty_unless(output_mask[2], w_down_t),
                _empty_unless(output_mask[3] and unit_scale is not None, scale))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:6])
        ctx.activation = inputs[6] if len(inputs) > 6 else "silu"

    def setup_context_with_gate_up(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:6], output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # else autograd fills a zero "gradient" as large as gate_up
        ctx.activation = inputs[6] if len(inputs) > 6 else "silu"

    def backward_autograd(ctx, grad, *_grad_gate_up):
        x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale = ctx.saved_tensors[:6]
        if grad is None:  # only after forward_with_gate_up (its gradients are not materialised)
            grad = torch.zeros_like(x)
        gate_up = ((ctx.saved_tensors[6] if len(ctx.saved_tensors) > 6 else None),) if takes_gate_up else ()
        need = ctx.needs_input_grad
        wanted = [need[0], need[1], need[2], unit_scale is not None and need[5]]
        grads = backward(grad, x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale, *gate_up, ctx.activation,
                         wanted)
        dx, dwgu, dwdt, dscale = _grads_or_none(grads, wanted)
        return dx, dwgu, dwdt, None, None, dscale, None

    torch.library.register_fake(forward, forward_fake)
    torch.library.register_fake(backward, backward_fake)
    torch.library.register_autograd(forward, backward_autograd, setup_context=setup_context)
    if takes_gate_up:
        torch.library.register_fake(forward_with_gate_up, forward_with_gate_up_fake)
        torch.library.register_autograd(forward_with_gate_up, backward_autograd,
                                        setup_context=setup_context_with_gate_up)


def masked_mlp(forward, backward) -> None:
    """``forward(x, w_up, w_down_t, keep_idx, keep_count, b_up, unit_scale, activation) -> y``;
    ``backward(grad, <the eight inputs>, output_mask[5]) -> (dx, dw_up, dw_down_t, db_up, dunit_scale)``."""

    def forward_fake(x, w_up, w_down_t, keep_idx, keep_count, b_up, unit_scale, activation):
        return torch.empty_like(x)

    def backward_fake(grad_out, x, w_up, w_down_t, keep_idx, keep_count, b_up, unit_scale, activation, output_mask):
        out = [_empty_unless(output_mask[0], x), _empty_unless(output_mask[1], w_up),
               _empty_unless(output_mask[2], w_down_t)]
        for wanted, t in zip(output_mask[3:], (b_up, unit_scale)):
            out.append(_empty_unless(bool(wanted) and t is not None, t if t is not None else x))
        return tuple(out)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:7])
        ctx.activation = inputs[7]

    def backward_autograd(ctx, grad):
        x, w_up, w_down_t, keep_idx, keep_count, b_up, unit_scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        wanted = [need[0], need[1], need[2], b_up is not None and need[5], unit_scale is not None and need[6]]
        grads = backward(grad, x, w_up, w_down_t, keep_idx, keep_count, b_up, unit_scale, ctx.activation, wanted)
        dx, dwu, dwdt, db, dscale = _grads_or_none(grads, wanted)
        return dx, dwu, dwdt, None, None, db, dscale, None

    torch.library.register_fake(forward, forward_fake)
    torch.library.register_fake(backward, backward_fake)
    torch.library.register_autograd(forward, backward_autograd, setup_context=setup_context)


def masked_attention(forward, backward) -> None:
    """``forward(x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv, q_norm, k_norm, unit_scale,
    norm_eps, scale, position_ids, attention_mask, window, head_keep) -> y``; ``backward(grad, <the
    seventeen inputs>, output_mask[7]) -> (dx, dw_qkv, dw_o_t, db_qkv, dq_norm, dk_norm, dunit_scale)``.
    cos, sin, position_ids, attention_mask and head_keep get no gradient; window is an int (0: none)."""

    def forward_fake(x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv, q_norm, k_norm, unit_scale, norm_eps,
                     scale, position_ids=None, attention_mask=None, window=0, head_keep=None):
        return torch.empty_like(x)

    def backward_fake(grad_out, x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv, q_norm, k_norm, unit_scale,
                      norm_eps, scale, position_ids, attention_mask, window, head_keep, output_mask):
        out = [_empty_unless(output_mask[0], x), _empty_unless(output_mask[1], w_qkv),
               _empty_unless(output_mask[2], w_o_t)]
        for wanted, t in zip(output_mask[3:], (b_qkv, q_norm, k_norm, unit_scale)):
            out.append(_empty_unless(bool(wanted) and t is not None, t if t is not None else x))
        return tuple(out)

    def setup_context(ctx, inputs, output):
        inputs = tuple(inputs) + (None, None, 0, None)[len(inputs) - 13:]  # the defaults of the last four
        ctx.save_for_backward(*inputs[:11], inputs[13], inputs[14], inputs[16])
        ctx.norm_eps, ctx.scale, ctx.window = inputs[11], inputs[12], inputs[15]

    def backward_autograd(ctx, grad):
        (x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv, q_norm, k_norm, unit_scale, position_ids,
         attention_mask, head_keep) = ctx.saved_tensors
        need = ctx.needs_input_grad
        wanted = [need[0], need[1], need[2]] + [t is not None and need[i]
                                                for i, t in ((7, b_qkv), (8, q_norm), (9, k_norm), (10, unit_scale))]
        grads = backward(grad, x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv, q_norm, k_norm, unit_scale,
                         ctx.norm_eps, ctx.scale, position_ids, attention_mask, ctx.window, head_keep, wanted)
        dx, dwqkv, dwo, db, dqn, dkn, dscale = _grads_or_none(grads, wanted)
        return (dx, dwqkv, dwo, None, None, None, None, db, dqn, dkn, dscale, None, None) + \
            (None,) * (len(need) - 13)

    torch.library.register_fake(forward, forward_fake)
    torch.library.register_fake(backward, backward_fake)
    torch.library.register_autograd(forward, backward_autograd, setup_context=setup_context)


def linear_cross_entropy(forward, backward, *, backward_takes_chunk_size: bool) -> None:
    """``forward(h, weight, target, ignore_index, chunk_size) -> (loss, lse)``, both ``(N,)`` fp32;
    ``backward(grad_loss, grad_lse, h, weight, target, lse, ignore_index, [chunk_size,]
    output_mask[2]) -> (dh, dweight)``. ``backward_takes_chunk_size``: whether the backward
    operator has the chunk_size argument (Triton's works in row chunks of at most that many
    rows; C++'s in fixed tiles of its own)."""

    def forward_fake(h, weight, target, ignore_index, chunk_size):
        return h.new_empty((h.shape[0],), dtype=torch.float32), h.new_empty((h.shape[0],), dtype=torch.float32)

    def backward_fake(grad_loss, grad_lse, h, weight, target, lse, ignore_index, *chunk_size_and_output_mask):
        output_mask = chunk_size_and_output_mask[-1]
        return _empty_unless(output_mask[0], h), _empty_unless(output_mask[1], weight)

    def setup_context(ctx, inputs, output):
        h, weight, target, ignore_index, chunk_size = inputs
        ctx.save_for_backward(h, weight, target, output[1])
        ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size

    def backward_autograd(ctx, grad_loss, grad_lse):
        h, weight, target, lse = ctx.saved_tensors
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
        grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        chunk_size = (ctx.chunk_size,) if backward_takes_chunk_size else ()
        grads = backward(grad_loss, grad_lse, h, weight, target, lse, ctx.ignore_index, *chunk_size, wanted)
        dh, dw = _grads_or_none(grads, wanted)
        return dh, dw, None, None, None

    torch.library.register_fake(forward, forward_fake)
    torch.library.register_fake(backward, backward_fake)
    torch.library.register_autograd(forward, backward_autograd, setup_context=setup_context)


def rms_norm(rms_norm_forward, add_rms_norm_forward, backward) -> None:
    """RMSNorm and its fused residual add share one backward operator:
    ``rms_norm_forward(x, weight, eps, out_dtype) -> y``; ``add_rms_norm_forward(x, residual,
    weight, eps, out_dtype) -> (y, h = x.to(residual.dtype) + residual)``; ``backward(grad_y,
    grad_h or None, h, weight, eps, need_weight) -> (dh, dweight)`` (dh in h's dtype, dweight
    empty when not needed). ``y`` is in ``out_dtype``, else in the dtype ``h`` (x for rms_norm)
    promotes to with ``weight``; x's gradient is dh converted to x's dtype."""

    def y_like(h, weight, out_dtype):
        dtype = out_dtype if out_dtype is not None else torch.promote_types(weight.dtype, h.dtype)
        return h.new_empty(h.shape, dtype=dtype)

    def rms_norm_fake(x, weight, eps, out_dtype=None):
        return y_like(x, weight, out_dtype)

    def add_rms_norm_fake(x, residual, weight, eps, out_dtype=None):
        return y_like(residual, weight, out_dtype), residual.new_empty(residual.shape)

    def backward_fake(grad_out, grad_h, h, weight, eps, need_weight):
        return h.new_empty(h.shape), weight.new_empty(weight.shape if need_weight else (0,))

    def rms_norm_setup(ctx, inputs, output):
        x, weight, eps, _ = inputs
        ctx.save_for_backward(x, weight)
        ctx.eps = eps

    def rms_norm_backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw = backward(grad, None, x, weight, ctx.eps, need[1])
        return (dx if need[0] else None), (dw if need[1] else None), None, None

    def add_rms_norm_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1], inputs[2])  # h = x.to(residual.dtype) + residual, weight
        ctx.eps = inputs[3]
        ctx.x_dtype = inputs[0].dtype

    def add_rms_norm_backward(ctx, grad, grad_h):
        h, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dh, dw = backward(grad, grad_h, h, weight, ctx.eps, need[2])
        dx = dh.to(ctx.x_dtype) if need[0] else None
        return dx, (dh if need[1] else None), (dw if need[2] else None), None, None

    torch.library.register_fake(rms_norm_forward, rms_norm_fake)
    torch.library.register_fake(add_rms_norm_forward, add_rms_norm_fake)
    torch.library.register_fake(backward, backward_fake)
    torch.library.register_autograd(rms_norm_forward, rms_norm_backward, setup_context=rms_norm_setup)
    torch.library.register_autograd(add_rms_norm_forward, add_rms_norm_backward, setup_context=add_rms_norm_setup)


def layer_norm(forward, backward) -> None:
    """``forward(x, weight, bias, eps) -> y`` (x's dtype); ``backward(grad, x, weight, bias, eps,
    output_mask[3]) -> (dx, dweight, dbias)``; the forward's statistics are recomputed, not saved."""

    def forward_fake(x, weight, bias, eps):
        return torch.empty_like(x)

    def backward_fake(grad_out, x, weight, bias, eps, output_mask):
        return (_empty_unless(output_mask[0], x), _empty_unless(output_mask[1], weight),
                _empty_unless(bool(output_mask[2]) and bias is not None, bias if bias is not None else weight))

    def setup_context(ctx, inputs, output):
        x, weight, bias, eps = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.eps = eps

    def backward_autograd(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        wanted = [need[0], need[1], bias is not None and need[2]]
        dx, dw, db = _grads_or_none(backward(grad, x, weight, bias, ctx.eps, wanted), wanted)
        return dx, dw, db, None

    torch.library.register_fake(forward, forward_fake)
    torch.library.register_fake(backward, backward_fake)
    torch.library.register_autograd(forward, backward_autograd, setup_context=setup_context)
