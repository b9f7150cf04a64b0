"""RMSNorm, optionally fused with the residual add that precedes it.

One program per row; statistics in fp32, the normalised value cast back to the input dtype
before the weight multiplies it (as Hugging Face's Llama RMSNorm does)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x ``(..., d)``, weight ``(d,)`` -> ``(..., d)`` in x's dtype."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``h = x + residual``; returns ``(rms_norm(h), h)``."""
    return _launch(x, residual, weight, eps)
