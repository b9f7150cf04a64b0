"""Kernels shared by the masked ops: products with gathered weight rows, and the per-unit
reduction that gives the weight gradients of the kept units only.

A masked op's unit u (MLP channel, KV group) owns R consecutive rows of a weight viewed as
``(n_units * R, K)`` (R = 1 for ``w_down_t``, 2 for the interleaved ``w_gate_up``, (r+2)*hd for
``w_qkv``, r*hd for ``w_o_t``). Per sample, activations live in *slot space*: column ``j*R + i``
of an ``(S, N, n_units * R)`` buffer belongs to row i of the sample's j-th kept unit
``keep_idx[s, j]``; columns past ``keep_count[s] * R`` are never read.

- :func:`gathered_rows_product`: ``Y[s] = A[s, :, :c*R] @ W[rows of the kept units]``, the
  reduction over kept units only (W_down, W_o, and the dX of every backward).
- :func:`gathered_projection`: ``A[s, :, :c*R] = X[s] @ W[rows of the kept units]^T``, the
  projection onto kept units only (dY W_o^T in the attention backward).

Both take ``a_units`` ``(S, n)`` int32, optionally: the j-th kept unit's columns of A are then
``a_units[s, j]*R ..`` instead of ``j*R ..`` (a sparse slot space: the attention's per-head blocks
laid out by group slot, with the pruned heads' columns left out of the work).
- :func:`unit_weight_grad`: ``dW[u*R + i] = sum_s A[s, :, pos_s(u)*R + i]^T B[s]`` over the
  samples that keep u, in sample order (no atomics: the same bits on every run); rows of units
  that no sample keeps stay exactly zero and their weights are never read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_precision, gemm_config


@triton.jit
def _a_columns(AUnits, s, M, f, f_ok, R: tl.constexpr, HAS_A_UNITS: tl.constexpr):
    """The columns of A that hold kept feature f (unit f // R, row f % R of it)."""
    if HAS_A_UNITS:
        return tl.load(AUnits + s * M + f // R, mask=f_ok, other=0).to(tl.int64) * R + f % R
    return f


@triton.jit
def _gathered_rows_kernel(A, W, KeepIdx, KeepCount, Scale, AUnits, Y, N, D, M, A_WIDTH, R: tl.constexpr,
                          HAS_SCALE: tl.constexpr, HAS_A_UNITS: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.program_id(2).to(tl.int64)
    row_ok = rows < N
    col_ok = cols < D
    n_features = tl.load(KeepCount + s) * R
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    a_base = A + s * N * A_WIDTH + rows.to(tl.int64)[:, None] * A_WIDTH
    for f0 in range(0, n_features, BLOCK_K):
        f = f0 + tl.arange(0, BLOCK_K)
        f_ok = f < n_features
        unit = tl.load(KeepIdx + s * M + f // R, mask=f_ok, other=0).to(tl.int64)
        a_col = _a_columns(AUnits, s, M, f, f_ok, R, HAS_A_UNITS)
        a = tl.load(a_base + a_col[None, :], mask=row_ok[:, None] & f_ok[None, :], other=0.0)
        if HAS_SCALE:  # per-unit scale of the activations (soft masks), applied in fp32
            scale = tl.load(Scale + s * M + f // R, mask=f_ok, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * scale[None, :]).to(W.dtype.element_ty)
        w = tl.load(W + (unit * R + f % R)[:, None] * D + cols[None, :], mask=f_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc += tl.dot(a, w, input_precision=PRECISION)
    out = Y + s * N * D + rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out, acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gathered_projection_kernel(X, W, KeepIdx, KeepCount, AUnits, Out, N, K, M, OUT_WIDTH, R: tl.constexpr,
                                HAS_A_UNITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                                BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    f = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(2).to(tl.int64)
    n_features = tl.load(KeepCount + s) * R
    if tl.program_id(1) * BLOCK_C >= n_features:
        return
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    f_ok = f < n_features
    unit = tl.load(KeepIdx + s * M + f // R, mask=f_ok, other=0).to(tl.int64)
    w_rows = unit * R + f % R
    x_base = X + s * N * K + rows.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_base + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + w_rows[:, None] * K + ks[None, :], mask=f_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    out_col = _a_columns(AUnits, s, M, f, f_ok, R, HAS_A_UNITS)
    out = Out + s * N * OUT_WIDTH + rows.to(tl.int64)[:, None] * OUT_WIDTH + out_col[None, :]
    tl.store(out, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & f_ok[None, :])


@triton.jit
def _unit_grad_kernel(A, Bm, Pos, Out, S, N, M, A_WIDTH, D, R: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # weight rows, unit-major
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < M * R
    col_ok = cols < D
    unit = rows // R
    sub = rows % R
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    a_base = A  # advanced by one sample per iteration (64-bit pointers: no index overflow)
    b_base = Bm
    for s in range(0, S):  # fixed sample order: no atomics, the same sum on every run
        pos = tl.load(Pos + s * M + unit, mask=row_ok, other=-1)
        kept = pos >= 0
        if tl.max(kept.to(tl.int32), axis=0) > 0:
            a_col = (pos * R + sub).to(tl.int64)
            for n0 in range(0, N, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                n_ok = n < N
                a = tl.load(a_base + n.to(tl.int64)[None, :] * A_WIDTH + a_col[:, None],
                            mask=kept[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_R, BLOCK_N): A^T
                b = tl.load(b_base + n.to(tl.int64)[:, None] * D + cols[None, :], mask=n_ok[:, None] & col_ok[None, :],
                            other=0.0)
                acc += tl.dot(a, b, input_precision=PRECISION)
        a_base += N * A_WIDTH
        b_base += N * D
    tl.store(Out + rows.to(tl.int64)[:, None] * D + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


def slot_positions(keep_idx: torch.Tensor, keep_count: torch.Tensor) -> torch.Tensor:
    """``(S, n) int32``: the slot j of unit u in sample s (``keep_idx[s, j] == u``, j < keep_count[s]),
    or -1 where s prunes u. Device ops only, no host sync."""
    S, n = keep_idx.shape
    slots = torch.arange(n, device=keep_idx.device, dtype=torch.int32).expand(S, n)
    kept_slot = torch.where(slots < keep_count[:, None], slots, torch.full_like(slots, -1))
    return torch.empty_like(keep_idx).scatter_(1, keep_idx.long(), kept_slot)


def _launch(dtype: torch.dtype, rows: int) -> tuple[dict, dict]:
    cfg = gemm_config(dtype, rows)
    return cfg, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def gathered_rows_product(a: torch.Tensor, w_rows: torch.Tensor, keep_idx: torch.Tensor, keep_count: torch.Tensor,
                          R: int, out_dtype: torch.dtype, unit_scale: torch.Tensor | None = None,
                          a_units: torch.Tensor | None = None) -> torch.Tensor:
    """a ``(S, N, n*R)`` slot space, w_rows ``(n*R, D)`` -> ``(S, N, D)``: sum over the kept units'
    rows only; unit_scale ``(S, n)`` (aligned with keep_idx) scales unit j's columns of a;
    a_units ``(S, n)`` int32 or None: where unit j's columns of a are (see the module docstring)."""
    S, N, width = a.shape
    D = w_rows.shape[1]
    y = torch.empty((S, N, D), dtype=out_dtype, device=a.device)
    if S == 0 or N == 0:
        return y
    cfg, launch = _launch(a.dtype, N)
    _gathered_rows_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(D, cfg["BLOCK_C"]), S)](
        a, w_rows, keep_idx, keep_count, w_rows if unit_scale is None else unit_scale,
        keep_idx if a_units is None else a_units, y, N, D, keep_idx.shape[1], width, R=R,
        HAS_SCALE=unit_scale is not None, HAS_A_UNITS=a_units is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_D=cfg["BLOCK_C"], PRECISION=dot_precision(a.dtype), **launch)
    return y


def gathered_projection(x: torch.Tensor, w_rows: torch.Tensor, keep_idx: torch.Tensor, keep_count: torch.Tensor,
                        R: int, a_units: torch.Tensor | None = None) -> torch.Tensor:
    """x ``(S, N, K)``, w_rows ``(n*R, K)`` -> ``(S, N, n*R)`` slot space (zeros past each sample's
    kept columns, and in the columns no unit of a_units names): x projected onto the kept units'
    rows only; a_units ``(S, n)`` int32 or None: where unit j's columns go (see the module docstring)."""
    S, N, K = x.shape
    n = keep_idx.shape[1]
    out = torch.zeros((S, N, n * R), dtype=x.dtype, device=x.device)
    if S == 0 or N == 0:
        return out
    cfg, launch = _launch(x.dtype, N)
    _gathered_projection_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(n * R, cfg["BLOCK_C"]), S)](
        x, w_rows, keep_idx, keep_count, keep_idx if a_units is None else a_units, out, N, K, n, n * R, R=R,
        HAS_A_UNITS=a_units is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_C=cfg["BLOCK_C"],
        BLOCK_K=cfg["BLOCK_K"], PRECISION=dot_precision(x.dtype), **launch)
    return out


def unit_weight_grad(a: torch.Tensor, b: torch.Tensor, pos: torch.Tensor, R: int) -> torch.Tensor:
    """a ``(S, N, n*R)`` slot space, b ``(S, N, D)``, pos from :func:`slot_positions` ->
    ``(n*R, D)`` float32: ``sum_s a[s]^T b[s]`` mapped back to unit rows; pruned everywhere -> 0."""
    S, N, width = a.shape
    D = b.shape[2]
    n = pos.shape[1]
    out = torch.zeros((n * R, D), dtype=torch.float32, device=a.device)
    if S == 0 or N == 0:
        return out
    cfg, launch = _launch(a.dtype, n * R)
    block_r = cfg["BLOCK_N"]
    _unit_grad_kernel[(triton.cdiv(n * R, block_r), triton.cdiv(D, cfg["BLOCK_C"]))](
        a, b, pos, out, S, N, n, width, D, R=R, BLOCK_R=block_r, BLOCK_N=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_C"],
        PRECISION=dot_precision(a.dtype), **launch)
    return out


def unit_bias_grad(a: torch.Tensor, pos: torch.Tensor, R: int) -> torch.Tensor:
    """a ``(S, N, n*R)`` slot space -> ``(n*R,)`` float32: column sums over rows and the samples
    that keep each unit (gather, then a sum in sample order: deterministic)."""
    S = a.shape[0]
    n = pos.shape[1]
    colsum = a.float().sum(1)  # (S, n*R)
    sub = torch.arange(R, device=a.device)
    col = (pos.long().clamp_min(0)[:, :, None] * R + sub).reshape(S, n * R)
    kept = (pos >= 0).repeat_interleave(R, dim=1)
    return torch.where(kept, colsum.gather(1, col), 0.0).sum(0)
