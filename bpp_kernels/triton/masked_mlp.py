"""Masked SwiGLU MLP: per sample, only the kept channels are computed.

Two kernels over a static grid (row tile, channel tile, sample) sized by the full channel count,
so nothing is read back to the host; a program whose tile starts past its sample's keep_count
exits at once, so pruned channels cost nothing but an early return. Row tiles vary fastest so
that programs running together share one gathered weight tile in L2.

1. ``_gate_up_kernel``: gathers the kept rows of the interleaved ``w_gate_up (m, 2, d)`` and
   writes ``silu(x W_g^T) * (x W_u^T)`` into a compacted intermediate ``(S, N, m)`` whose
   column j is the sample's j-th kept channel.
2. ``_down_kernel``: reduces over the kept channels only, gathering rows of the pre-transposed
   ``w_down_t (m, d)``. No split-K and no atomics: a sample's result does not depend on the
   other samples of the batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_precision, gemm_config


@triton.jit
def _gate_up_kernel(X, Wgu, KeepIdx, KeepCount, Act, N, D, M,
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
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    out = Act + s * N * M + rows.to(tl.int64)[:, None] * M + slots[None, :]
    tl.store(out, act.to(Act.dtype.element_ty), mask=row_ok[:, None] & slot_ok[None, :])


@triton.jit
def _down_kernel(Act, Wdt, KeepIdx, KeepCount, Y, N, D, M,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.program_id(2).to(tl.int64)
    row_ok = rows < N
    col_ok = cols < D
    count = tl.load(KeepCount + s)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    act_base = Act + s * N * M + rows.to(tl.int64)[:, None] * M
    for c0 in range(0, count, BLOCK_C):
        slots = c0 + tl.arange(0, BLOCK_C)
        slot_ok = slots < count
        channel = tl.load(KeepIdx + s * M + slots, mask=slot_ok, other=0).to(tl.int64)
        a = tl.load(act_base + slots[None, :], mask=row_ok[:, None] & slot_ok[None, :], other=0.0)
        w = tl.load(Wdt + channel[:, None] * D + cols[None, :], mask=slot_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(a, w, input_precision=PRECISION)
    out = Y + s * N * D + rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out, acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def masked_swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down_t: torch.Tensor, keep_idx: torch.Tensor,
                  keep_count: torch.Tensor) -> torch.Tensor:
    """x ``(S, ..., d)``; w_gate_up ``(m, 2, d)``; w_down_t ``(m, d)``; keep_idx ``(S, m)`` int32;
    keep_count ``(S,)`` int32 -> ``(S, ..., d)`` in x's dtype (zeros where nothing is kept)."""
    S, D = x.shape[0], x.shape[-1]
    M = w_down_t.shape[0]
    xs = x.reshape(S, -1, D).contiguous()
    N = xs.shape[1]
    y = torch.empty_like(xs)
    if S == 0 or N == 0:
        return y.view(x.shape)
    act = torch.empty((S, N, M), dtype=x.dtype, device=x.device)
    keep_idx, keep_count = keep_idx.contiguous(), keep_count.contiguous()
    precision = dot_precision(x.dtype)
    cfg = gemm_config(x.dtype, N)
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    # gate/up keeps two accumulators, so its channel tile is half as wide for the same registers
    chan_block = max(32, cfg["BLOCK_C"] // 2)
    _gate_up_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, chan_block), S)](
        xs, w_gate_up.contiguous(), keep_idx, keep_count, act, N, D, M,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_C=chan_block, BLOCK_D=cfg["BLOCK_K"], PRECISION=precision, **launch)
    _down_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(D, cfg["BLOCK_C"]), S)](
        act, w_down_t.contiguous(), keep_idx, keep_count, y, N, D, M,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_C=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_C"], PRECISION=precision, **launch)
    return y.view(x.shape)
