"""LayerNorm over the last dim and its backward, as ``torch.nn.functional.layer_norm`` computes it.

Forward: one program per row; the mean and the biased variance in fp32 (the variance from
``x - mean``, no cancellation), ``y = (x - mean) * rstd * weight + bias`` in fp32, one rounding to
the input dtype. A row's result depends only on that row.

Backward: one program per block of rows recomputes each row's statistics from the saved input and
writes ``dx = rstd * (dn - mean(dn) - xhat * mean(dn * xhat))`` with ``dn = dy * weight``; the
weight and bias gradients (sums of ``dy * xhat`` and ``dy``) are summed per block in fp32 and the
blocks' partial sums added in block order (no atomics). Both directions are ``torch.library``
custom ops, tied by :func:`bpp_kernels._autograd.layer_norm`.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .. import _autograd
from ._common import next_pow2

_ROWS_PER_PROGRAM = 16  # backward: rows whose weight/bias-gradient contributions one program sums


@triton.jit
def _layer_norm_kernel(X, W, B, Y, D, eps, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < D
    x = tl.load(X + row * D + cols, mask=in_row, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    centred = tl.where(in_row, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
    y = centred * rstd * tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=in_row)


@triton.jit
def _layer_norm_backward_kernel(X, W, DY, DX, DWPart, DBPart, ROWS, D, eps, ROWS_PER_PROGRAM: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    block = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < D
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), tl.float32)
    db = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(0, ROWS_PER_PROGRAM):
        row = block * ROWS_PER_PROGRAM + i
        if row < ROWS:
            off = row.to(tl.int64) * D + cols
            x = tl.load(X + off, mask=in_row, other=0.0).to(tl.float32)
            dy = tl.load(DY + off, mask=in_row, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=0) / D
            centred = tl.where(in_row, x - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
            xhat = centred * rstd
            dw += dy * xhat
            db += dy
            dn = dy * w
            dx = rstd * (dn - tl.sum(dn, axis=0) / D - xhat * (tl.sum(dn * xhat, axis=0) / D))
            tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=in_row)
    tl.store(DWPart + block.to(tl.int64) * D + cols, dw, mask=in_row)
    tl.store(DBPart + block.to(tl.int64) * D + cols, db, mask=in_row)


def _forward(x, weight, bias, eps):
    x = x.contiguous()
    D = x.shape[-1]
    rows = x.numel() // D if D else 0
    y = torch.empty_like(x)
    if rows:
        block = next_pow2(D)
        _layer_norm_kernel[(rows,)](x, weight.contiguous(), weight if bias is None else bias.contiguous(), y, D, eps,
                                    HAS_BIAS=bias is not None, BLOCK_D=block, num_warps=max(1, min(16, block // 512)))
    return y


def _backward(grad_out, x, weight, bias, eps, output_mask):
    x = x.contiguous()
    D = x.shape[-1]
    rows = x.numel() // D if D else 0
    need_x, need_w, need_b = output_mask
    need_b = need_b and bias is not None
    dx = torch.empty_like(x)
    blocks = triton.cdiv(rows, _ROWS_PER_PROGRAM)
    dw_part = torch.zeros((max(blocks, 1), D), dtype=torch.float32, device=x.device)
    db_part = torch.zeros((max(blocks, 1), D), dtype=torch.float32, device=x.device)
    if rows:
        block = next_pow2(D)
        _layer_norm_backward_kernel[(blocks,)](
            x, weight.contiguous(), grad_out.to(x.dtype).contiguous(), dx, dw_part, db_part, rows, D, eps,
            ROWS_PER_PROGRAM=_ROWS_PER_PROGRAM, BLOCK_D=block, num_warps=max(1, min(16, block // 512)))
    empty = lambda: x.new_empty(0)  # noqa: E731  (a fresh tensor per output: outputs must not alias)
    return (dx if need_x else empty(), dw_part.sum(0).to(weight.dtype) if need_w else empty(),
            db_part.sum(0).to(bias.dtype) if need_b else empty())


@torch.library.custom_op("bpp_triton::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return _forward(x, weight, bias, eps)


@torch.library.custom_op("bpp_triton::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor], eps: float, output_mask: List[bool]
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, x, weight, bias, eps, output_mask)


_autograd.layer_norm(_layer_norm_op, _layer_norm_backward_op)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x ``(..., d)``, weight ``(d,)``, bias ``(d,)`` or None -> ``(..., d)`` in x's dtype.
    Differentiable in x, weight and bias."""
    return _layer_norm_op(x, weight, bias, float(eps))
