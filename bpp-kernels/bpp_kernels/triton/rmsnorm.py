"""RMSNorm, optionally fused with the residual add that precedes it, and its backward.

Forward: one program per row; for add_rms_norm ``h = x.to(residual.dtype) + residual`` (written,
in residual's dtype); statistics in fp32, the normalised value cast back to h's dtype before the
weight multiplies it (as Hugging Face's Llama RMSNorm does), the product in the dtype weight and h
promote to, then converted to ``out_dtype`` (when given) in the same store.

Backward: one program per block of rows recomputes each row's statistics from the saved input
(h for add_rms_norm, an output of the forward) and writes ``dh = rstd * (dn - xhat * mean(dn *
xhat))`` with ``dn = dy * weight`` (plus the gradient that reached ``h`` directly, for
add_rms_norm, whose x gets dh converted to x's dtype); the weight gradient is summed per block in
fp32 and the blocks' partial sums are added in block order (no atomics). The rounding of the
normalised value to h's dtype is treated as the identity. All three ops are ``torch.library`` custom ops,
tied by :func:`bpp_kernels._autograd.rms_norm`.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _autograd
from ._common import next_pow2

_ROWS_PER_PROGRAM = 16  # backward: rows whose weight-gradient contributions one program sums


@triton.jit
def _rms_norm_kernel(X, R, W, Y, H, D, eps, HAS_RESIDUAL: tl.constexpr, PRODUCT_IN_H: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < D
    x = tl.load(X + row * D + cols, mask=in_row, other=0.0)
    if HAS_RESIDUAL:  # h = x.to(residual.dtype) + residual, in residual's dtype
        x = x.to(R.dtype.element_ty) + tl.load(R + row * D + cols, mask=in_row, other=0.0)
        tl.store(H + row * D + cols, x, mask=in_row)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    w = tl.load(W + cols, mask=in_row, other=0.0)
    normed = (xf * rstd).to(x.dtype)  # rounded to h's dtype before the weight, as the reference does
    if PRODUCT_IN_H:  # weight in h's dtype: the product is rounded to it (then to Y's dtype)
        y = w * normed
    else:  # weight * normed promotes to fp32
        y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=in_row)


@triton.jit
def _rms_norm_backward_kernel(X, W, DY, DH, DX, DWPart, ROWS, D, eps, HAS_DH: tl.constexpr,
                              ROWS_PER_PROGRAM: tl.constexpr, BLOCK_D: tl.constexpr):
    block = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < D
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(0, ROWS_PER_PROGRAM):
        row = block * ROWS_PER_PROGRAM + i
        if row < ROWS:
            off = row.to(tl.int64) * D + cols
            x = tl.load(X + off, mask=in_row, other=0.0)
            xf = x.to(tl.float32)
            dy = tl.load(DY + off, mask=in_row, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
            xhat = xf * rstd
            dw += dy * xhat.to(x.dtype).to(tl.float32)
            dn = dy * w
            dx = rstd * (dn - xhat * (tl.sum(dn * xhat, axis=0) / D))
            if HAS_DH:
                dx += tl.load(DH + off, mask=in_row, other=0.0).to(tl.float32)
            tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=in_row)
    tl.store(DWPart + block.to(tl.int64) * D + cols, dw, mask=in_row)


def _launch(x, residual, weight, eps, out_dtype):
    x = x.contiguous()
    D = x.shape[-1]
    rows = x.numel() // D if D else 0
    h_dtype = residual.dtype if residual is not None else x.dtype
    # weight * normed.to(h's dtype) promotes like torch does (an fp32 weight on bf16 h gives fp32)
    y_dtype = out_dtype if out_dtype is not None else torch.promote_types(weight.dtype, h_dtype)
    y = torch.empty(x.shape, dtype=y_dtype, device=x.device)
    h = torch.empty(x.shape, dtype=h_dtype, device=x.device) if residual is not None else x
    if rows:
        r = residual.contiguous() if residual is not None else x
        block = next_pow2(D)
        _rms_norm_kernel[(rows,)](x, r, weight.contiguous(), y, h, D, eps, HAS_RESIDUAL=residual is not None,
                                  PRODUCT_IN_H=weight.dtype == h_dtype, BLOCK_D=block,
                                  num_warps=max(1, min(16, block // 512)))
    return y, h


def _backward(grad_out, grad_h, h, weight, eps, need_weight):
    h = h.contiguous()
    D = h.shape[-1]
    rows = h.numel() // D if D else 0
    dx = torch.empty_like(h)
    blocks = triton.cdiv(rows, _ROWS_PER_PROGRAM)
    dw_part = torch.zeros((max(blocks, 1), D), dtype=torch.float32, device=h.device)
    if rows:
        block = next_pow2(D)
        _rms_norm_backward_kernel[(blocks,)](
            h, weight.contiguous(), grad_out.contiguous(), h if grad_h is None else grad_h.contiguous(), dx, dw_part,
            rows, D, eps, HAS_DH=grad_h is not None, ROWS_PER_PROGRAM=_ROWS_PER_PROGRAM, BLOCK_D=block,
            num_warps=max(1, min(16, block // 512)))
    dw = dw_part.sum(0).to(weight.dtype) if need_weight else weight.new_empty(0)
    return dx, dw


@torch.library.custom_op("bpp_triton::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return _launch(x, None, weight, eps, out_dtype)[0]


@torch.library.custom_op("bpp_triton::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, residual, weight, eps, out_dtype)


@torch.library.custom_op("bpp_triton::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(grad_out: torch.Tensor, grad_h: Optional[torch.Tensor], h: torch.Tensor,
                          weight: torch.Tensor, eps: float, need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(grad_out, grad_h, h, weight, eps, need_weight)


_autograd.rms_norm(_rms_norm_op, _add_rms_norm_op, _rms_norm_backward_op)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x ``(..., d)``, weight ``(d,)`` -> ``(..., d)`` in out_dtype, else in x's dtype promoted with
    weight's. Differentiable in x and weight."""
    return _rms_norm_op(x, weight, float(eps), out_dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 out_dtype: torch.dtype | None = None):
    """``h = x.to(residual.dtype) + residual``; returns ``(rms_norm(h, weight, eps, out_dtype), h)``.
    Differentiable in x, residual and weight."""
    return _add_rms_norm_op(x, residual, weight, float(eps), out_dtype)
