"""Fused LM head + cross-entropy: per-row loss of ``h @ W.T`` with an online log-sum-exp over
vocabulary tiles, so the (N, V) logits never exist.

Two kernels. ``_partial_lse_kernel`` runs over (row tile, vocabulary slice): each program keeps
a running max and sum of exponentials over its slice (and the target's logit when it falls
there) in fp32. ``_combine_kernel`` merges the slices of each row in slice order. Slicing the
vocabulary gives a GPU enough programs when there are few rows; the slice width depends only
on the vocabulary size, never on N, and no atomics are used, so a row's loss does not depend on
the other rows of the launch (batch invariant) and is the same from run to run. The combine
kernel also stores each row's log-sum-exp (a second output of the op), which the backward reads.

Backward, over row chunks (at most ``chunk_size`` rows, and fewer when the vocabulary is large,
so a chunk's gradient block stays under 2**26 entries): ``_dlogits_kernel`` recomputes the
chunk's logits tile by tile in fp32 and writes ``dlogits = (g_loss + g_lse) softmax - g_loss
onehot(target)`` in h's dtype; then ``dh = dlogits W`` and ``dW += dlogits^T h`` are two GEMMs
(torch.mm). The full (N, V) logits never exist. Forward and backward are ``torch.library``
custom ops tied by :func:`bpp_kernels._autograd.linear_cross_entropy`.
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from .. import _autograd
from ._common import INTERPRET, dot_precision


@triton.jit
def _partial_lse_kernel(Hs, W, Target, PartMax, PartSum, PartPicked, N, V, D, V_SLICE,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    vslice = tl.program_id(1)
    row_ok = rows < N
    target = tl.load(Target + rows, mask=row_ok, other=0)
    running_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_N,), tl.float32)
    picked = tl.zeros((BLOCK_N,), tl.float32)
    rows64 = rows.to(tl.int64)
    v_start = vslice * V_SLICE
    v_end = tl.minimum(v_start + V_SLICE, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        vocab = v0 + tl.arange(0, BLOCK_V)
        vocab_ok = vocab < v_end
        logits = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            h = tl.load(Hs + rows64[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            w = tl.load(W + vocab.to(tl.int64)[:, None] * D + cols[None, :], mask=vocab_ok[:, None] & col_ok[None, :],
                        other=0.0)
            logits += tl.dot(h, tl.trans(w), input_precision=PRECISION)
        logits = tl.where(vocab_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
        picked += tl.sum(tl.where(vocab[None, :] == target[:, None], logits, 0.0), axis=1)
    out = vslice.to(tl.int64) * N + rows
    tl.store(PartMax + out, running_max, mask=row_ok)
    tl.store(PartSum + out, running_sum, mask=row_ok)
    tl.store(PartPicked + out, picked, mask=row_ok)


@triton.jit
def _combine_kernel(PartMax, PartSum, PartPicked, Target, Loss, Lse, N, N_SLICES, ignore_index,
                    BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for i in range(0, N_SLICES):
        row_max = tl.maximum(row_max, tl.load(PartMax + i * N + rows, mask=row_ok, other=0.0))
    total = tl.zeros((BLOCK_N,), tl.float32)
    picked = tl.zeros((BLOCK_N,), tl.float32)
    for i in range(0, N_SLICES):  # fixed slice order: the same sum on every run
        m = tl.load(PartMax + i * N + rows, mask=row_ok, other=0.0)
        total += tl.load(PartSum + i * N + rows, mask=row_ok, other=1.0) * tl.exp(m - row_max)  # no log(0)
        picked += tl.load(PartPicked + i * N + rows, mask=row_ok, other=0.0)  # one slice holds the target
    target = tl.load(Target + rows, mask=row_ok, other=0)
    lse = row_max + tl.log(total)
    tl.store(Lse + rows, lse, mask=row_ok)
    tl.store(Loss + rows, tl.where(target == ignore_index, 0.0, lse - picked), mask=row_ok)


@triton.jit
def _dlogits_kernel(Hs, W, Target, Lse, CoefP, CoefT, DLogits, N, V, D,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    vocab = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    vocab_ok = vocab < V
    rows64 = rows.to(tl.int64)
    logits = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        h = tl.load(Hs + rows64[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(W + vocab.to(tl.int64)[:, None] * D + cols[None, :], mask=vocab_ok[:, None] & col_ok[None, :],
                    other=0.0)
        logits += tl.dot(h, tl.trans(w), input_precision=PRECISION)
    lse = tl.load(Lse + rows, mask=row_ok, other=0.0)
    coef_p = tl.load(CoefP + rows, mask=row_ok, other=0.0)
    coef_t = tl.load(CoefT + rows, mask=row_ok, other=0.0)
    target = tl.load(Target + rows, mask=row_ok, other=-1)
    grad = coef_p[:, None] * tl.exp(logits - lse[:, None]) - tl.where(vocab[None, :] == target[:, None],
                                                                      coef_t[:, None], 0.0)
    out = DLogits + rows64[:, None] * V + vocab[None, :]
    tl.store(out, grad.to(DLogits.dtype.element_ty), mask=row_ok[:, None] & vocab_ok[None, :])


def _config(dtype: torch.dtype) -> dict:
    # fixed tiles (never sized by N): a row's loss must not depend on how many rows run with it
    if INTERPRET:  # a narrow slice so that the tests cross slice boundaries at small vocabularies
        return dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, V_SLICE=128, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, V_SLICE=4096, num_warps=4, num_stages=3)
    return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, V_SLICE=4096, num_warps=8, num_stages=3)


def _forward(h, weight, target, ignore_index):
    h, weight, target = h.contiguous(), weight.contiguous(), target.contiguous()
    N, D = h.shape
    V = weight.shape[0]
    loss = torch.empty(N, dtype=torch.float32, device=h.device)
    lse = torch.empty(N, dtype=torch.float32, device=h.device)
    if N == 0:
        return loss, lse
    cfg = _config(h.dtype)
    n_slices = triton.cdiv(V, cfg["V_SLICE"])
    part_max, part_sum, part_picked = torch.empty((3, n_slices, N), dtype=torch.float32, device=h.device)
    _partial_lse_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), n_slices)](
        h, weight, target, part_max, part_sum, part_picked, N, V, D, cfg["V_SLICE"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"], PRECISION=dot_precision(h.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _combine_kernel[(triton.cdiv(N, 128),)](part_max, part_sum, part_picked, target, loss, lse, N, n_slices,
                                            ignore_index, BLOCK_N=128)
    return loss, lse


_MAX_CHUNK_ENTRIES = 2**26  # a backward chunk's dlogits block: 128 MiB in fp16, 256 MiB in fp32


def _backward(grad_loss, grad_lse, h, weight, target, lse, ignore_index, chunk_size, output_mask):
    need_h, need_w = output_mask
    h, weight, target = h.contiguous(), weight.contiguous(), target.contiguous()
    N, D = h.shape
    V = weight.shape[0]
    coef_t = torch.where(target != ignore_index, grad_loss.float(), 0.0).contiguous()
    coef_p = (coef_t + grad_lse.float()).contiguous()
    dh = torch.empty_like(h) if need_h else h.new_empty(0)
    dw = torch.zeros((V, D), dtype=torch.float32, device=h.device) if need_w else None
    cfg = _config(h.dtype)
    rows = max(1, min(chunk_size, _MAX_CHUNK_ENTRIES // max(V, 1)))
    for r0 in range(0, N if (need_h or need_w) else 0, rows):
        n = min(rows, N - r0)
        h_chunk = h[r0:r0 + n]
        dlogits = torch.empty((n, V), dtype=h.dtype, device=h.device)
        _dlogits_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))](
            h_chunk, weight, target[r0:r0 + n], lse[r0:r0 + n], coef_p[r0:r0 + n], coef_t[r0:r0 + n], dlogits,
            n, V, D, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
            PRECISION=dot_precision(h.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if need_h:
            torch.mm(dlogits, weight, out=dh[r0:r0 + n])
        if need_w:
            dw += (dlogits.t() @ h_chunk).float()
    return dh, (dw.to(weight.dtype) if need_w else weight.new_empty(0))


@torch.library.custom_op("bpp_triton::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int,
                             chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(h, weight, target, ignore_index)


@torch.library.custom_op("bpp_triton::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(grad_loss: torch.Tensor, grad_lse: torch.Tensor, h: torch.Tensor,
                                      weight: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, ignore_index: int,
                                      chunk_size: int, output_mask: List[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(grad_loss, grad_lse, h, weight, target, lse, ignore_index, chunk_size, output_mask)


_autograd.linear_cross_entropy(_linear_cross_entropy_op, _linear_cross_entropy_backward_op,
                               backward_takes_chunk_size=True)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                         chunk_size: int = 4096) -> torch.Tensor:
    """h ``(N, d)``, weight ``(V, d)``, target ``(N,)`` int64 -> ``(N,)`` float32 (ignored rows 0).

    Logits are accumulated in fp32 (never rounded to h's dtype). The forward's memory is bounded
    by its tiles (3 fp32 values per row and vocabulary slice); ``chunk_size`` bounds the rows of
    one backward chunk. Differentiable in h and weight.
    """
    return _linear_cross_entropy_op(h, weight, target, int(ignore_index), int(chunk_size))[0]
