"""Masked gated MLP (SwiGLU, or GeGLU with ``activation="gelu_tanh"``): per sample, only the kept
channels are computed.

Two kernels over a static grid (row tile, channel tile, sample) sized by the full channel count,
so nothing is read back to the host; a program whose tile starts past its sample's keep_count
exits at once, so pruned channels cost nothing but an early return. Row tiles vary fastest so
that programs running together share one gathered weight tile in L2.

1. ``_gate_up_kernel``: gathers the kept rows of the interleaved ``w_gate_up (m, 2, d)`` and
   writes ``act(x W_g^T) * (x W_u^T)`` (act: SiLU or tanh-GELU, :func:`_glu_activation`) into a
   compacted intermediate ``(S, N, m)`` whose column j is the sample's j-th kept channel.
   With ``unit_scale`` the activation of the j-th kept channel is multiplied by its scale here.
2. the down projection reduces over the kept channels only, gathering rows of the
   pre-transposed ``w_down_t (m, d)`` (:func:`._gathered.gathered_rows_product`). No split-K and
   no atomics: a sample's result does not depend on the other samples of the batch.

Backward (nothing but the inputs is saved): ``_swiglu_backward_kernel`` recomputes a tile's gate
and up projections and ``dH = dY W_down^T`` in one pass over d, and writes ``[dG, dU]``
interleaved like ``w_gate_up`` (slot space ``(S, N, 2m)``), the scaled activation ``H*a`` and the
per-row-tile partial sums of ``dH*H`` (the scale gradient). Then ``dX = [dG, dU] W`` over the kept
rows, and the weight gradients of the kept channels by :func:`._gathered.unit_weight_grad`.

Both directions are ``torch.library`` custom ops (``bpp_triton::masked_swiglu`` and its
``_backward``) tied by :func:`bpp_kernels._autograd.masked_swiglu`, so ``torch.compile`` sees two
opaque calls.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .. import _autograd
from ._common import dot_precision, gemm_config
from ._gathered import gathered_rows_product, slot_positions, unit_weight_grad

# the ACTIVATION constexpr of the kernels below
_ACTIVATION_CODE = {"silu": 0, "gelu_tanh": 1}


@triton.jit
def _glu_activation(g, ACTIVATION: tl.constexpr):
    """(act(g), p) in fp32 with act(g) = g * p: SiLU (0, p = sigmoid(g)), or tanh-GELU (1),
    0.5 g (1 + tanh(z)) = g * sigmoid(2z) with z = sqrt(2/pi) (g + 0.044715 g^3)."""
    if ACTIVATION == 0:
        p = tl.sigmoid(g)
    else:
        p = tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
    return g * p, p


@triton.jit
def _glu_activation_slope(g, p, ACTIVATION: tl.constexpr):
    """act'(g) from the p of :func:`_glu_activation`."""
    if ACTIVATION == 0:
        slope = p * (1.0 + g * (1.0 - p))
    else:
        slope = p + g * p * (1.0 - p) * 1.5957691216057308 * (1.0 + 0.134145 * g * g)
    return slope


@triton.jit
def _gate_up_kernel(X, Wgu, KeepIdx, KeepCount, Scale, Act, N, D, M, HAS_SCALE: tl.constexpr,
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
    acc_gate = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x = tl.load(x_base + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w_mask = slot_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(Wgu + channel[:, None] * (2 * D) + cols[None, :], mask=w_mask, other=0.0)
        w_up = tl.load(Wgu + channel[:, None] * (2 * D) + D + cols[None, :], mask=w_mask, other=0.0)
        acc_gate += tl.dot(x, tl.trans(w_gate), input_precision=PRECISION)
        acc_up += tl.dot(x, tl.trans(w_up), input_precision=PRECISION)
    gate, _ = _glu_activation(acc_gate, ACTIVATION)
    act = gate * acc_up
    if HAS_SCALE:
        act *= tl.load(Scale + s * M + slots, mask=slot_ok, other=0.0).to(tl.float32)[None, :]
    out = Act + s * N * M + rows.to(tl.int64)[:, None] * M + slots[None, :]
    tl.store(out, act.to(Act.dtype.element_ty), mask=row_ok[:, None] & slot_ok[None, :])


@triton.jit
def _swiglu_backward_kernel(X, DY, Wgu, Wdt, KeepIdx, KeepCount, Scale, DGU, HS, DScalePart, N, D, M,
                            HAS_SCALE: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
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
    acc_gate = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    acc_dh = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        xy_mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_base + cols[None, :], mask=xy_mask, other=0.0)
        dy = tl.load(dy_base + cols[None, :], mask=xy_mask, other=0.0)
        w_mask = slot_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(Wgu + channel[:, None] * (2 * D) + cols[None, :], mask=w_mask, other=0.0)
        w_up = tl.load(Wgu + channel[:, None] * (2 * D) + D + cols[None, :], mask=w_mask, other=0.0)
        w_down = tl.load(Wdt + channel[:, None] * D + cols[None, :], mask=w_mask, other=0.0)
        acc_gate += tl.dot(x, tl.trans(w_gate), input_precision=PRECISION)
        acc_up += tl.dot(x, tl.trans(w_up), input_precision=PRECISION)
        acc_dh += tl.dot(dy, tl.trans(w_down), input_precision=PRECISION)
    gate, p = _glu_activation(acc_gate, ACTIVATION)
    h = gate * acc_up
    dh = acc_dh
    if HAS_SCALE:
        scale = tl.load(Scale + s * M + slots, mask=slot_ok, other=0.0).to(tl.float32)
        part = tl.sum(tl.where(row_ok[:, None], acc_dh * h, 0.0), axis=0)
        tl.store(DScalePart + (s * tl.num_programs(0) + row_tile) * M + slots, part, mask=slot_ok)
        dh = dh * scale[None, :]
        h = h * scale[None, :]
    if ACTIVATION == 0:  # today's SwiGLU expression, the same bits
        d_gate = dh * acc_up * p * (1.0 + acc_gate * (1.0 - p))
    else:
        d_gate = dh * acc_up * _glu_activation_slope(acc_gate, p, ACTIVATION)
    d_up = dh * gate
    mask = row_ok[:, None] & slot_ok[None, :]
    dgu = DGU + s * N * (2 * M) + rows.to(tl.int64)[:, None] * (2 * M) + 2 * slots[None, :]
    tl.store(dgu, d_gate.to(DGU.dtype.element_ty), mask=mask)
    tl.store(dgu + 1, d_up.to(DGU.dtype.element_ty), mask=mask)
    tl.store(HS + s * N * M + rows.to(tl.int64)[:, None] * M + slots[None, :], h.to(HS.dtype.element_ty), mask=mask)


def _forward(x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale, activation):
    S, D = x.shape[0], x.shape[-1]
    M = w_down_t.shape[0]
    xs = x.reshape(S, -1, D).contiguous()
    N = xs.shape[1]
    if S == 0 or N == 0:
        return torch.empty_like(x)
    act = torch.empty((S, N, M), dtype=x.dtype, device=x.device)
    keep_idx, keep_count = keep_idx.contiguous(), keep_count.contiguous()
    scale = None if unit_scale is None else unit_scale.contiguous()
    cfg = gemm_config(x.dtype, N)
    # gate/up keeps two accumulators, so its channel tile is half as wide for the same registers
    chan_block = max(32, cfg["BLOCK_C"] // 2)
    _gate_up_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, chan_block), S)](
        xs, w_gate_up.contiguous(), keep_idx, keep_count, act if scale is None else scale, act, N, D, M,
        HAS_SCALE=scale is not None, ACTIVATION=_ACTIVATION_CODE[activation], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_C=chan_block, BLOCK_D=cfg["BLOCK_K"], PRECISION=dot_precision(x.dtype), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    y = gathered_rows_product(act, w_down_t.contiguous(), keep_idx, keep_count, 1, x.dtype)
    return y.view(x.shape)


def _backward(grad_out, x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale, activation, output_mask):
    S, D = x.shape[0], x.shape[-1]
    M = w_down_t.shape[0]
    xs = x.reshape(S, -1, D).contiguous()
    dys = grad_out.reshape(S, -1, D).to(x.dtype).contiguous()
    N = xs.shape[1]
    need_x, need_wgu, need_wdt, need_scale = output_mask
    need_scale = need_scale and unit_scale is not None
    keep_idx, keep_count = keep_idx.contiguous(), keep_count.contiguous()
    wgu, wdt = w_gate_up.contiguous(), w_down_t.contiguous()
    scale = None if unit_scale is None else unit_scale.contiguous()
    cfg = gemm_config(x.dtype, N)
    chan_block = max(32, cfg["BLOCK_C"] // 2)  # three accumulators: as narrow as gate/up's
    row_tiles = triton.cdiv(max(N, 1), cfg["BLOCK_N"])
    dgu = torch.zeros((S, N, 2 * M), dtype=x.dtype, device=x.device)  # [dG, dU] per kept channel, slot space
    hs = torch.zeros((S, N, M), dtype=x.dtype, device=x.device)
    dscale_part = torch.zeros((S, row_tiles, M), dtype=torch.float32, device=x.device)
    if S and N:
        _swiglu_backward_kernel[(row_tiles, triton.cdiv(M, chan_block), S)](
            xs, dys, wgu, wdt, keep_idx, keep_count, hs if scale is None else scale, dgu, hs, dscale_part, N, D, M,
            HAS_SCALE=scale is not None, ACTIVATION=_ACTIVATION_CODE[activation], BLOCK_N=cfg["BLOCK_N"],
            BLOCK_C=chan_block, BLOCK_D=cfg["BLOCK_K"], PRECISION=dot_precision(x.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    empty = lambda: x.new_empty(0)  # noqa: E731  (a fresh tensor per output: outputs must not alias)
    dx = gathered_rows_product(dgu, wgu.view(2 * M, D), keep_idx, keep_count, 2, x.dtype).view(x.shape) \
        if need_x else empty()
    pos = slot_positions(keep_idx, keep_count) if (need_wgu or need_wdt) else None
    dwgu = unit_weight_grad(dgu, xs, pos, 2).view(M, 2, D).to(w_gate_up.dtype) if need_wgu else empty()
    dwdt = unit_weight_grad(hs, dys, pos, 1).to(w_down_t.dtype) if need_wdt else empty()
    if need_scale:
        slots = torch.arange(M, device=x.device)
        dscale = torch.where(slots < keep_count[:, None], dscale_part.sum(1), 0.0).to(unit_scale.dtype)
    else:
        dscale = empty()
    return dx, dwgu, dwdt, dscale


@torch.library.custom_op("bpp_triton::masked_swiglu", mutates_args=())
def _masked_swiglu_op(x: torch.Tensor, w_gate_up: torch.Tensor, w_down_t: torch.Tensor, keep_idx: torch.Tensor,
                      keep_count: torch.Tensor, unit_scale: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    return _forward(x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale, activation)


@torch.library.custom_op("bpp_triton::masked_swiglu_backward", mutates_args=())
def _masked_swiglu_backward_op(grad_out: torch.Tensor, x: torch.Tensor, w_gate_up: torch.Tensor,
                               w_down_t: torch.Tensor, keep_idx: torch.Tensor, keep_count: torch.Tensor,
                               unit_scale: Optional[torch.Tensor], activation: str, output_mask: List[bool]
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale, activation, output_mask)


_autograd.masked_swiglu(_masked_swiglu_op, _masked_swiglu_backward_op)


def masked_swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down_t: torch.Tensor, keep_idx: torch.Tensor,
                  keep_count: torch.Tensor, unit_scale: torch.Tensor | None = None,
                  activation: str = "silu") -> torch.Tensor:
    """x ``(S, ..., d)``; w_gate_up ``(m, 2, d)``; w_down_t ``(m, d)``; keep_idx ``(S, m)`` int32;
    keep_count ``(S,)`` int32; unit_scale ``(S, m)`` or None; activation "silu" or "gelu_tanh" ->
    ``(S, ..., d)`` in x's dtype (zeros where nothing is kept). Differentiable in x, the weights
    and unit_scale."""
    if activation not in _ACTIVATION_CODE:
        raise ValueError(f"masked_swiglu: activation must be {' or '.join(map(repr, _ACTIVATION_CODE))}, "
                         f"got {activation!r}")
    return _masked_swiglu_op(x, w_gate_up, w_down_t, keep_idx, keep_count, unit_scale, activation)
