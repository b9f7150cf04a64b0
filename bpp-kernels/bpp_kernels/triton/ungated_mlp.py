"""Masked non-gated MLP (OPT, GPT-2, Pythia): per sample, only the kept channels are computed.

The structure of :mod:`.masked_mlp` (the SwiGLU kernels) with one projection instead of two:

1. ``_up_kernel`` over a static grid (row tile, channel tile, sample) sized by the full channel
   count (nothing is read back to the host; a program whose tile starts past its sample's
   keep_count exits at once) gathers the kept rows of ``w_up (m, d)`` and the kept entries of
   ``b_up``, and writes ``act(x W_up^T + b_up) * a`` into a compacted intermediate ``(S, N, m)``
   whose column j is the sample's j-th kept channel. ``act`` is exact GELU (erf), the tanh GELU
   (``z * sigmoid(2u)``, the same function as ``0.5 z (1 + tanh u)``) or ReLU, in fp32.
2. the down projection reduces over the kept channels only, gathering rows of ``w_down_t (m, d)``
   (:func:`._gathered.gathered_rows_product`). No split-K and no atomics: a sample's result does
   not depend on the other samples of the batch. The down projection's bias is the caller's.

Backward (nothing but the inputs is saved): ``_mlp_backward_kernel`` recomputes a tile's
pre-activations ``Z`` and ``dH = dY W_down^T`` in one pass over d and writes ``dZ = act'(Z) dH a``
and the scaled activation ``act(Z) a`` (slot space ``(S, N, m)``), and the per-row-tile partial
sums of ``dH act(Z)`` (the scale gradient). Then ``dX = dZ W_up`` over the kept rows, the weight
gradients of the kept channels by :func:`._gathered.unit_weight_grad` and the bias gradient by
:func:`._gathered.unit_bias_grad`.

Both directions are ``torch.library`` custom ops (``bpp_triton::masked_mlp`` and its ``_backward``)
tied by :func:`bpp_kernels._autograd.masked_mlp`.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .. import _autograd
from ._common import dot_precision, gemm_config
from ._gathered import gathered_rows_product, slot_positions, unit_bias_grad, unit_weight_grad

ACTIVATION_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2}


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 0:  # exact GELU: z * Phi(z)
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == 1:  # tanh GELU: 0.5 z (1 + tanh u) = z sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3)
        out = z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    else:
        out = tl.maximum(z, 0.0)
    return out


@triton.jit
def _activation_grad(z, ACTIVATION: tl.constexpr):
    """act'(z)."""
    if ACTIVATION == 0:  # Phi(z) + z phi(z)
        out = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACTIVATION == 1:
        sig = tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
        out = sig + z * sig * (1.0 - sig) * 1.5957691216057308 * (1.0 + 0.134145 * z * z)
    else:
        out = tl.where(z > 0.0, 1.0, 0.0)
    return out


@triton.jit
def _up_kernel(X, Wu, Bu, KeepIdx, KeepCount, Scale, Act, N, D, M, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
               ACTIVATION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
               PRECISION: tl.constexpr):
    row_tile = tl.program_id(0)
    chan_tile = tl.program_id(1)
    s = tl.program_id(2).to(tl.int64)
    count = tl.load(KeepCount + s)
    if chan_tile * BLOCK_C >= count:
        return
    slots = chan_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    slot_ok = slots < count
    channel = tl.load(KeepIdx + s * M + slots, mask=slot_ok, other=0).to(tl.int64)
    rows = row_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x_base = X + s * N * D + rows.to(tl.int64)[:, None] * D
    acc = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x = tl.load(x_base + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(Wu + channel[:, None] * D + cols[None, :], mask=slot_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bu + channel, mask=slot_ok, other=0.0).to(tl.float32)[None, :]
    act = _activation(acc, ACTIVATION)
    if HAS_SCALE:
        act *= tl.load(Scale + s * M + slots, mask=slot_ok, other=0.0).to(tl.float32)[None, :]
    out = Act + s * N * M + rows.to(tl.int64)[:, None] * M + slots[None, :]
    tl.store(out, act.to(Act.dtype.element_ty), mask=row_ok[:, None] & slot_ok[None, :])


@triton.jit
def _mlp_backward_kernel(X, DY, Wu, Bu, Wdt, KeepIdx, KeepCount, Scale, DZ, HS, DScalePart, N, D, M,
                         HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, ACTIVATION: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    row_tile = tl.program_id(0)
    chan_tile = tl.program_id(1)
    s = tl.program_id(2).to(tl.int64)
    count = tl.load(KeepCount + s)
    if chan_tile * BLOCK_C >= count:
        return
    slots = chan_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    slot_ok = slots < count
    channel = tl.load(KeepIdx + s * M + slots, mask=slot_ok, other=0).to(tl.int64)
    rows = row_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x_base = X + s * N * D + rows.to(tl.int64)[:, None] * D
    dy_base = DY + s * N * D + rows.to(tl.int64)[:, None] * D
    acc_z = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    acc_dh = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        xy_mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_base + cols[None, :], mask=xy_mask, other=0.0)
        dy = tl.load(dy_base + cols[None, :], mask=xy_mask, other=0.0)
        w_mask = slot_ok[:, None] & col_ok[None, :]
        w_up = tl.load(Wu + channel[:, None] * D + cols[None, :], mask=w_mask, other=0.0)
        w_down = tl.load(Wdt + channel[:, None] * D + cols[None, :], mask=w_mask, other=0.0)
        acc_z += tl.dot(x, tl.trans(w_up), input_precision=PRECISION)
        acc_dh += tl.dot(dy, tl.trans(w_down), input_precision=PRECISION)
    if HAS_BIAS:
        acc_z += tl.load(Bu + channel, mask=slot_ok, other=0.0).to(tl.float32)[None, :]
    h = _activation(acc_z, ACTIVATION)
    dh = acc_dh
    if HAS_SCALE:
        scale = tl.load(Scale + s * M + slots, mask=slot_ok, other=0.0).to(tl.float32)
        part = tl.sum(tl.where(row_ok[:, None], acc_dh * h, 0.0), axis=0)
        tl.store(DScalePart + (s * tl.num_programs(0) + row_tile) * M + slots, part, mask=slot_ok)
        dh = dh * scale[None, :]
        h = h * scale[None, :]
    dz = dh * _activation_grad(acc_z, ACTIVATION)
    mask = row_ok[:, None] & slot_ok[None, :]
    offs = s * N * M + rows.to(tl.int64)[:, None] * M + slots[None, :]
    tl.store(DZ + offs, dz.to(DZ.dtype.element_ty), mask=mask)
    tl.store(HS + offs, h.to(HS.dtype.element_ty), mask=mask)


def _forward(x, w_up, w_down_t, keep_idx, keep_count, b_up, unit_scale, activation):
    S, D = x.shape[0], x.shape[-1]
    M = w_down_t.shape[0]
    xs = x.reshape(S, -1, D).contiguous()
    N = xs.shape[1]
    if S == 0 or N == 0 or M == 0:
        return torch.zeros_like(x)
    act = torch.empty((S, N, M), dtype=x.dtype, device=x.device)
    keep_idx, keep_count = keep_idx.contiguous(), keep_count.contiguous()
    scale = None if unit_scale is None else unit_scale.contiguous()
    bias = None if b_up is None else b_up.contiguous()
    cfg = gemm_config(x.dtype, N)
    _up_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_C"]), S)](
        xs, w_up.contiguous(), act if bias is None else bias, keep_idx, keep_count, act if scale is None else scale,
        act, N, D, M, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, ACTIVATION=ACTIVATION_CODES[activation],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_C=cfg["BLOCK_C"], BLOCK_D=cfg["BLOCK_K"], PRECISION=dot_precision(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    y = gathered_rows_product(act, w_down_t.contiguous(), keep_idx, keep_count, 1, x.dtype)
    return y.view(x.shape)


def _backward(grad_out, x, w_up, w_down_t, keep_idx, keep_count, b_up, unit_scale, activation, output_mask):
    S, D = x.shape[0], x.shape[-1]
    M = w_down_t.shape[0]
    xs = x.reshape(S, -1, D).contiguous()
    dys = grad_out.reshape(S, -1, D).to(x.dtype).contiguous()
    N = xs.shape[1]
    need_x, need_wu, need_wdt, need_b, need_scale = output_mask
    need_b = need_b and b_up is not None
    need_scale = need_scale and unit_scale is not None
    keep_idx, keep_count = keep_idx.contiguous(), keep_count.contiguous()
    wu, wdt = w_up.contiguous(), w_down_t.contiguous()
    bias = None if b_up is None else b_up.contiguous()
    scale = None if unit_scale is None else unit_scale.contiguous()
    cfg = gemm_config(x.dtype, N)
    chan_block = max(32, cfg["BLOCK_C"] // 2)  # two accumulators: as narrow as the SwiGLU backward's
    row_tiles = triton.cdiv(max(N, 1), cfg["BLOCK_N"])
    dz = torch.zeros((S, N, M), dtype=x.dtype, device=x.device)  # dZ per kept channel, slot space
    hs = torch.zeros((S, N, M), dtype=x.dtype, device=x.device)
    dscale_part = torch.zeros((S, row_tiles, M), dtype=torch.float32, device=x.device)
    if S and N and M:
        _mlp_backward_kernel[(row_tiles, triton.cdiv(M, chan_block), S)](
            xs, dys, wu, hs if bias is None else bias, wdt, keep_idx, keep_count, hs if scale is None else scale, dz,
            hs, dscale_part, N, D, M, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
            ACTIVATION=ACTIVATION_CODES[activation], BLOCK_N=cfg["BLOCK_N"], BLOCK_C=chan_block,
            BLOCK_D=cfg["BLOCK_K"], PRECISION=dot_precision(x.dtype), num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
    empty = lambda: x.new_empty(0)  # noqa: E731  (a fresh tensor per output: outputs must not alias)
    if need_x:
        dx = gathered_rows_product(dz, wu, keep_idx, keep_count, 1, x.dtype).view(x.shape) if M else \
            torch.zeros_like(x)
    else:
        dx = empty()
    pos = slot_positions(keep_idx, keep_count) if (need_wu or need_wdt or need_b) else None
    dwu = unit_weight_grad(dz, xs, pos, 1).to(w_up.dtype) if need_wu else empty()
    dwdt = unit_weight_grad(hs, dys, pos, 1).to(w_down_t.dtype) if need_wdt else empty()
    db = unit_bias_grad(dz, pos, 1).to(b_up.dtype) if need_b else empty()
    if need_scale:
        slots = torch.arange(M, device=x.device)
        dscale = torch.where(slots < keep_count[:, None], dscale_part.sum(1), 0.0).to(unit_scale.dtype)
    else:
        dscale = empty()
    return dx, dwu, dwdt, db, dscale


@torch.library.custom_op("bpp_triton::masked_mlp", mutates_args=())
def _masked_mlp_op(x: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor, keep_idx: torch.Tensor,
                   keep_count: torch.Tensor, b_up: Optional[torch.Tensor], unit_scale: Optional[torch.Tensor],
                   activation: str) -> torch.Tensor:
    return _forward(x, w_up, w_down_t, keep_idx, keep_count, b_up, unit_scale, activation)


@torch.library.custom_op("bpp_triton::masked_mlp_backward", mutates_args=())
def _masked_mlp_backward_op(grad_out: torch.Tensor, x: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
                            keep_idx: torch.Tensor, keep_count: torch.Tensor, b_up: Optional[torch.Tensor],
                            unit_scale: Optional[torch.Tensor], activation: str, output_mask: List[bool]
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, x, w_up, w_down_t, keep_idx, keep_count, b_up, unit_scale, activation, output_mask)


_autograd.masked_mlp(_masked_mlp_op, _masked_mlp_backward_op)


def masked_mlp(x: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor, keep_idx: torch.Tensor,
               keep_count: torch.Tensor, b_up: torch.Tensor | None = None, activation: str = "gelu",
               unit_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x ``(S, ..., d)``; w_up, w_down_t ``(m, d)``; keep_idx ``(S, m)`` int32; keep_count ``(S,)``
    int32; b_up ``(m,)`` or None; activation gelu / gelu_tanh / relu; unit_scale ``(S, m)`` or None
    -> ``(S, ..., d)`` in x's dtype (zeros where nothing is kept). Differentiable in x, the weights,
    b_up and unit_scale."""
    return _masked_mlp_op(x, w_up, w_down_t, keep_idx, keep_count, b_up, unit_scale, activation)
