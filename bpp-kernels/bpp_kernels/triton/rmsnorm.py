"""RMSNorm, optionally fused with the residual add that precedes it, and its backward.

Forward: one program per row; statistics in fp32, the normalised value cast back to the input
dtype before the weight multiplies it (as Hugging Face's Llama RMSNorm does).

Backward: one program per block of rows recomputes each row's statistics from the saved input
(``h = x + residual`` for add_rms_norm, an output of the forward) and writes
``dx = rstd * (dn - xhat * mean(dn * xhat))`` with ``dn = dy * weight`` (plus the gradient that
reached ``h`` directly, for add_rms_norm); the weight gradient is summed per block in fp32 and the
blocks' partial sums are added in block order (no atomics). The rounding of the normalised value
to the input dtype is treated as the identity. All three ops are ``torch.library`` custom ops,
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
def _rms_norm_kernel(X, R, W, Y, H, D, eps, HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < D
    x = tl.load(X + row * D + cols, mask=in_row, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(R + row * D + cols, mask=in_row, other=0.0)
        tl.store(H + row * D + cols, x, mask=in_row)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    w = tl.load(W + cols, mask=in_row, other=0.0)
    normed = (xf * rstd).to(x.dtype)  # rounded to x's dtype before the weight, as the reference does
    out_dtype = Y.dtype.element_ty
    y = w.to(out_dtype) * normed.to(out_dtype)
    tl.store(Y + row * D + cols, y, mask=in_row)


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


def _launch(x, residual, weight, eps):
    x = x.contiguous()
    D = x.shape[-1]
    rows = x.numel() // D if D else 0
    # weight * normed.to(x.dtype) promotes like torch does (an fp32 weight on bf16 x gives fp32)
    y = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    h = torch.empty_like(x) if residual is not None else x
    if rows:
        r = residual.contiguous() if residual is not None else x
        block = next_pow2(D)
        _rms_norm_kernel[(rows,)](x, r, weight.contiguous(), y, h, D, eps, HAS_RESIDUAL=residual is not None,
                                  BLOCK_D=block, num_warps=max(1, min(16, block // 512)))
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
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, eps)[0]


@torch.library.custom_op("bpp_triton::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, residual, weight, eps)


@torch.library.custom_op("bpp_triton::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(grad_out: torch.Tensor, grad_h: Optional[torch.Tensor], h: torch.Tensor,
                          weight: torch.Tensor, eps: float, need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(grad_out, grad_h, h, weight, eps, need_weight)


_autograd.rms_norm(_rms_norm_op, _add_rms_norm_op, _rms_norm_backward_op)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x ``(..., d)``, weight ``(d,)`` -> ``(..., d)`` in x's dtype (promoted with weight's).
    Differentiable in x and weight."""
    return _rms_norm_op(x, weight, float(eps))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``h = x + residual``; returns ``(rms_norm(h), h)``. Differentiable in x, residual and weight."""
    return _add_rms_norm_op(x, residual, weight, float(eps))
