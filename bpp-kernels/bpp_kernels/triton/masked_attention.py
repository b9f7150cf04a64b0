"""Masked causal GQA attention: per sample, only the kept KV groups are projected, attended and
reduced through W_o.

Three kernels, each over a static grid sized by the full group count (no host sync); programs
whose group slot lies past the sample's keep_count exit at once. The sample is the slowest grid
axis, so programs running together belong to one sample and share its gathered weights in L2:

1. ``_qkv_kernel`` (row tile, slot × head-of-group, sample): the kept group's q/k/v rows are a
   contiguous block of ``w_qkv (G, (r+2)*hd, d)``; bias, per-head RMSNorm (Qwen3) and RoPE are
   fused in the epilogue. Each head is computed as two halves so rotate-half is a register swap.
2. ``_flash_kernel`` (query tile, batch × slot × query head, sample): causal flash attention with
   an online softmax in fp32; a query head reads its group's single K/V (GQA without copies).
3. the o_proj (row tile, output tile, sample) reduces over the kept heads' features only,
   gathering rows of ``w_o_t (G, r*hd, d)`` (:func:`._gathered.gathered_rows_product`), with
   ``unit_scale`` multiplying each kept group's features on the way.

Backward (only the inputs are saved; FlashAttention-2's scheme): kernel 1 recomputes q/k/v (and
the projections before the q/k norm, when there is one), kernel 2 recomputes the attention with
its per-row log-sum-exp, ``dO = dY W_o^T`` runs over the kept groups only
(:func:`._gathered.gathered_projection`); ``_flash_dkdv_kernel`` (key tile, batch × slot, sample)
sums dK and dV over the r query heads of a group inside one program (GQA without atomics) and
``_flash_dq_kernel`` (query tile, batch × slot × head, sample) gives dQ. RoPE and the q/k norm are
differentiated by a few elementwise torch ops over the slot-space buffers; then ``dX`` and the
kept groups' weight gradients come from :mod:`._gathered`. Pruned groups' weights are never read.

Query heads inside groups (``head_keep (S, G, r)`` bool): its slot-order copy (which head of
which slot a sample computes) is read by the kernels, and a program with nothing to compute exits
at once: kernel 1's program of a pruned query head, and its key and value programs of a group
keeping no query head; kernel 2's and ``_flash_dq_kernel``'s program of a pruned head;
``_flash_dkdv_kernel`` skips a pruned head's query tiles (and exits for a group keeping none). The
products through W_o, dY W_o^T and the weight GEMMs then run over the kept heads' hd-row blocks
only (:mod:`._gathered` with units of hd rows and the blocks' columns named by ``a_units``), so a
pruned head's W_o rows and q rows (and a headless group's k/v rows) are never read. Without
head_keep the kernels are compiled as before (a constexpr flag) and the products run by group.

Positions and masks: ``position_ids`` pick each token's cos/sin row in kernel 1 (and in the
RoPE transpose); a key padding mask and a sliding window are applied in the three flash kernels,
which then skip the key tiles (forward, dQ) or query tiles (dK/dV) wholly outside the window and
use a guarded online softmax: a query row that sees no key gets zeros, a log-sum-exp of 0 and no
gradient. Without them the kernels are compiled as before (constexpr flags), the same bits.

Both directions are ``torch.library`` custom ops (``bpp_triton::masked_attention`` and its
``_backward``) tied by :func:`bpp_kernels._autograd.masked_attention`.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .. import _autograd, reference
from ._common import INTERPRET, dot_precision, gemm_config, next_pow2
from ._gathered import gathered_projection, gathered_rows_product, slot_positions, unit_bias_grad, unit_weight_grad


@triton.jit
def _program_ids(KeepCount, G, HEADS):
    """The program of a grid (tile, (batch * G + slot) * HEADS + head, sample) as
    ``(tile, batch, slot, head, sample, keep_count of the sample)``. Slots at or past keep_count
    hold no kept group: their programs exit at once."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // (G * HEADS)
    slot = (bh // HEADS) % G
    head = bh % HEADS
    s = tl.program_id(2).to(tl.int64)
    count = tl.load(KeepCount + s)
    return tile, b, slot, head, s, count


@triton.jit
def _idle(HeadKeep, s, G, slot, head, R, R_P: tl.constexpr):
    """Whether the program of (slot, head) has nothing to compute under head_keep (``(S, G*R)``
    uint8 in slot order): a query head (head < R) that is pruned, or the key or value (head >= R)
    of a group that keeps no query head."""
    j = tl.arange(0, R_P)
    flags = tl.load(HeadKeep + (s * G + slot) * R + j, mask=j < R, other=0)
    wanted = (j < R) & ((j == head) | (head >= R))
    return tl.max(((flags != 0) & wanted).to(tl.int32), axis=0) == 0


@triton.jit
def _head_offsets(s, b, slot, head, B, T, G, R, HD):
    """Where the batch row b of a (sample, slot, query head) starts: in Q ``(S, G, R, N, hd)``, in K
    and V ``(S, G, N, hd)``, and in the per-row buffers Lse and Delta ``(S, G, R, N)``."""
    N = B * T
    q_off = ((s * G + slot) * R + head) * N * HD + b * T * HD
    kv_off = (s * G + slot) * N * HD + b * T * HD
    row_off = ((s * G + slot) * R + head) * N + b * T
    return q_off, kv_off, row_off


@triton.jit
def _head_rms_norm(acc_lo, acc_hi, W, e, e_ok, half, HD, eps, dtype: tl.constexpr):
    """Per-head RMSNorm (Qwen3's q/k norm) of a head held as two halves, rounded like the reference."""
    lo = acc_lo.to(dtype).to(tl.float32)  # the reference normalises the projection in x's dtype
    hi = acc_hi.to(dtype).to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / HD + eps)
    w_lo = tl.load(W + e, mask=e_ok, other=0.0)
    w_hi = tl.load(W + half + e, mask=e_ok, other=0.0)
    return ((w_lo[None, :] * (lo * rstd[:, None]).to(dtype)).to(tl.float32),
            (w_hi[None, :] * (hi * rstd[:, None]).to(dtype)).to(tl.float32))


@triton.jit
def _qkv_kernel(X, Wqkv, Bqkv, QNorm, KNorm, Cos, Sin, Pos, KeepIdx, KeepCount, HeadKeep, Q, K, V, Pre,
                N, T, P, D, G, R, HD, eps,
                HAS_BIAS: tl.constexpr, HAS_QNORM: tl.constexpr, HAS_KNORM: tl.constexpr, STORE_PRE: tl.constexpr,
                HAS_POS: tl.constexpr, HAS_HEAD_KEEP: tl.constexpr, R_P: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HALF_P: tl.constexpr, PRECISION: tl.constexpr):
    # head 0..R-1: query heads, R: key, R+1: value (no batch axis: the row tile spans B*T)
    row_tile, _, slot, head, s, count = _program_ids(KeepCount, G, R + 2)
    if slot >= count:
        return
    if HAS_HEAD_KEEP:
        if _idle(HeadKeep, s, G, slot, head, R, R_P):
            return
    rows = row_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    group = tl.load(KeepIdx + s * G + slot).to(tl.int64)
    half = HD // 2
    e = tl.arange(0, HALF_P)
    e_ok = e < half
    row_ok = rows < N
    w_rows = group * (R + 2) * HD + head * HD  # first weight row of this head
    x_base = X + s * N * D + rows.to(tl.int64)[:, None] * D
    acc_lo = tl.zeros((BLOCK_N, HALF_P), tl.float32)
    acc_hi = tl.zeros((BLOCK_N, HALF_P), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x = tl.load(x_base + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w_mask = e_ok[:, None] & col_ok[None, :]
        w_lo = tl.load(Wqkv + (w_rows + e)[:, None] * D + cols[None, :], mask=w_mask, other=0.0)
        w_hi = tl.load(Wqkv + (w_rows + half + e)[:, None] * D + cols[None, :], mask=w_mask, other=0.0)
        acc_lo += tl.dot(x, tl.trans(w_lo), input_precision=PRECISION)
        acc_hi += tl.dot(x, tl.trans(w_hi), input_precision=PRECISION)
    if HAS_BIAS:
        b_base = Bqkv + group * (R + 2) * HD + head * HD
        acc_lo += tl.load(b_base + e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
        acc_hi += tl.load(b_base + half + e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    dtype = Q.dtype.element_ty
    is_query = head < R
    is_key = head == R
    if HAS_POS:  # the cos/sin row of token (b, t) = row b*T + t; clamped: out-of-range (check=False) never reads past
        t = tl.load(Pos + rows, mask=row_ok, other=0).to(tl.int64)
        t = tl.minimum(tl.maximum(t, 0), P - 1)
    else:
        t = (rows % T).to(tl.int64)
    mask2 = row_ok[:, None] & e_ok[None, :]
    row64 = rows.to(tl.int64)[:, None]
    if STORE_PRE:  # the backward's copy of the q/k projections before norm and RoPE, (S, G, R+1, N, hd)
        if head <= R:
            pre = Pre + ((s * G + slot) * (R + 1) + head) * N * HD + row64 * HD
            tl.store(pre + e[None, :], acc_lo.to(dtype), mask=mask2)
            tl.store(pre + half + e[None, :], acc_hi.to(dtype), mask=mask2)
    if HAS_QNORM:
        if is_query:
            acc_lo, acc_hi = _head_rms_norm(acc_lo, acc_hi, QNorm, e, e_ok, half, HD, eps, dtype)
    if HAS_KNORM:
        if is_key:
            acc_lo, acc_hi = _head_rms_norm(acc_lo, acc_hi, KNorm, e, e_ok, half, HD, eps, dtype)
    if head <= R:  # RoPE on queries and keys
        cos_lo = tl.load(Cos + t[:, None] * HD + e[None, :], mask=mask2, other=0.0).to(tl.float32)
        cos_hi = tl.load(Cos + t[:, None] * HD + half + e[None, :], mask=mask2, other=0.0).to(tl.float32)
        sin_lo = tl.load(Sin + t[:, None] * HD + e[None, :], mask=mask2, other=0.0).to(tl.float32)
        sin_hi = tl.load(Sin + t[:, None] * HD + half + e[None, :], mask=mask2, other=0.0).to(tl.float32)
        rot_lo = acc_lo * cos_lo - acc_hi * sin_lo
        rot_hi = acc_hi * cos_hi + acc_lo * sin_hi
        acc_lo, acc_hi = rot_lo, rot_hi
    if is_query:
        base = Q + ((s * G + slot) * R + head) * N * HD
    elif is_key:
        base = K + (s * G + slot) * N * HD
    else:
        base = V + (s * G + slot) * N * HD
    tl.store(base + row64 * HD + e[None, :], acc_lo.to(dtype), mask=mask2)
    tl.store(base + row64 * HD + half + e[None, :], acc_hi.to(dtype), mask=mask2)


@triton.jit
def _visible(tq, tk, tk_ok, b, T, KeyMask, window, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(query rows × key columns) bool: causal (key <= query), inside the window (query - key <
    window) and a real key (attention_mask[b, key])."""
    visible = (tk[None, :] <= tq[:, None]) & tk_ok[None, :]
    if HAS_WINDOW:
        visible = visible & (tq[:, None] - tk[None, :] < window)
    if HAS_PAD:
        real = tl.load(KeyMask + b * T + tk, mask=tk_ok, other=0) != 0
        visible = visible & real[None, :]
    return visible


@triton.jit
def _first_key(q_tile, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The first key tile a query tile can see: 0, or with a window the tile of its first row's
    earliest key."""
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(q_tile * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
    return first


@triton.jit
def _flash_kernel(Q, K, V, O, Lse, KeepCount, KeyMask, HeadKeep, B, T, G, R, HD, scale, window,
                  STORE_LSE: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_HEAD_KEEP: tl.constexpr, R_P: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HD_P: tl.constexpr, PRECISION: tl.constexpr):
    q_tile, b, slot, head, s, count = _program_ids(KeepCount, G, R)
    if slot >= count:
        return
    if HAS_HEAD_KEEP:
        if _idle(HeadKeep, s, G, slot, head, R, R_P):
            return
    q_off, kv_off, row_off = _head_offsets(s, b, slot, head, B, T, G, R, HD)
    N = B * T
    e = tl.arange(0, HD_P)
    e_ok = e < HD
    tq = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tq_ok = tq < T
    q = tl.load(Q + q_off + tq.to(tl.int64)[:, None] * HD + e[None, :], mask=tq_ok[:, None] & e_ok[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HD_P), tl.float32)
    end = tl.minimum((q_tile + 1) * BLOCK_M, T)  # causal: later keys are never needed
    start = _first_key(q_tile, window, BLOCK_M, BLOCK_N, HAS_WINDOW)  # window: earlier keys neither
    for k0 in range(start, end, BLOCK_N):
        tk = k0 + tl.arange(0, BLOCK_N)
        tk_ok = tk < T
        kv_mask = tk_ok[:, None] & e_ok[None, :]
        k = tl.load(K + kv_off + tk.to(tl.int64)[:, None] * HD + e[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off + tk.to(tl.int64)[:, None] * HD + e[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = _visible(tq, tk, tk_ok, b, T, KeyMask, window, HAS_PAD, HAS_WINDOW)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        if HAS_PAD or HAS_WINDOW:  # a row may have seen no key yet: never exp(-inf - -inf)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if HAS_PAD or HAS_WINDOW:  # a row that saw no key: output 0, log-sum-exp 0
        seen = l_i > 0
        l_safe = tl.where(seen, l_i, 1.0)
        out = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
        lse = tl.where(seen, m_i + tl.log(l_safe), 0.0)
    else:
        out = acc / l_i[:, None]
        lse = m_i + tl.log(l_i)
    if STORE_LSE:  # per query row, (S, G, R, N): what the backward needs to rebuild the probabilities
        tl.store(Lse + row_off + tq, lse, mask=tq_ok)
    feature = (slot * R + head) * HD + e
    o_base = O + s * N * (G * R * HD) + (b * T + tq).to(tl.int64)[:, None] * (G * R * HD)
    tl.store(o_base + feature[None, :], out.to(O.dtype.element_ty), mask=tq_ok[:, None] & e_ok[None, :])


@triton.jit
def _flash_dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, KeepCount, KeyMask, HeadKeep, B, T, G, R, HD, scale, window,
                       HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_HEAD_KEEP: tl.constexpr,
                       R_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HD_P: tl.constexpr,
                       PRECISION: tl.constexpr):
    k_tile, b, slot, _, s, count = _program_ids(KeepCount, G, 1)  # one program per group, not per head
    if slot >= count:
        return
    if HAS_HEAD_KEEP:  # a group keeping no query head: its dK and dV stay zero
        if _idle(HeadKeep, s, G, slot, R, R, R_P):
            return
    N = B * T
    e = tl.arange(0, HD_P)
    e_ok = e < HD
    tk = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    tk_ok = tk < T
    _, kv_off, _ = _head_offsets(s, b, slot, 0, B, T, G, R, HD)
    kv_ptrs = kv_off + tk.to(tl.int64)[:, None] * HD + e[None, :]
    kv_mask = tk_ok[:, None] & e_ok[None, :]
    k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_ptrs, mask=kv_mask, other=0.0)
    dtype = k.dtype
    dk = tl.zeros((BLOCK_N, HD_P), tl.float32)
    dv = tl.zeros((BLOCK_N, HD_P), tl.float32)
    first_q = (k_tile * BLOCK_N // BLOCK_M) * BLOCK_M  # causal: earlier queries never see these keys
    end_q = T
    if HAS_WINDOW:  # nor do queries window or more past the tile's last key
        end_q = tl.minimum(T, (k_tile + 1) * BLOCK_N - 1 + window)
    width = G * R * HD
    for head in range(0, R):  # the group's query heads share its K and V: sum them here, no atomics
        q_off, _, row_off = _head_offsets(s, b, slot, head, B, T, G, R, HD)
        q_base = Q + q_off
        do_base = DO + s * N * width + (slot * R + head) * HD
        head_end = end_q
        if HAS_HEAD_KEEP:  # a pruned head: no query tile
            head_end = tl.where(tl.load(HeadKeep + (s * G + slot) * R + head) != 0, end_q, first_q)
        for q0 in range(first_q, head_end, BLOCK_M):
            tq = q0 + tl.arange(0, BLOCK_M)
            tq_ok = tq < T
            q_mask = tq_ok[:, None] & e_ok[None, :]
            q = tl.load(q_base + tq.to(tl.int64)[:, None] * HD + e[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + (b * T + tq).to(tl.int64)[:, None] * width + e[None, :], mask=q_mask, other=0.0)
            lse = tl.load(Lse + row_off + tq, mask=tq_ok, other=0.0)
            delta = tl.load(Delta + row_off + tq, mask=tq_ok, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            visible = _visible(tq, tk, tk_ok, b, T, KeyMask, window, HAS_PAD, HAS_WINDOW) & tq_ok[:, None]
            p = tl.where(visible, tl.exp(scores - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(dtype)), q, input_precision=PRECISION)
    tl.store(DK + kv_ptrs, dk * scale, mask=kv_mask)
    tl.store(DV + kv_ptrs, dv, mask=kv_mask)


@triton.jit
def _flash_dq_kernel(Q, K, V, DO, Lse, Delta, DQ, KeepCount, KeyMask, HeadKeep, B, T, G, R, HD, scale, window,
                     HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_HEAD_KEEP: tl.constexpr,
                     R_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HD_P: tl.constexpr,
                     PRECISION: tl.constexpr):
    q_tile, b, slot, head, s, count = _program_ids(KeepCount, G, R)
    if slot >= count:
        return
    if HAS_HEAD_KEEP:
        if _idle(HeadKeep, s, G, slot, head, R, R_P):
            return
    q_off, kv_off, row_off = _head_offsets(s, b, slot, head, B, T, G, R, HD)
    N = B * T
    e = tl.arange(0, HD_P)
    e_ok = e < HD
    tq = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tq_ok = tq < T
    q_mask = tq_ok[:, None] & e_ok[None, :]
    q_ptrs = q_off + tq.to(tl.int64)[:, None] * HD + e[None, :]
    q = tl.load(Q + q_ptrs, mask=q_mask, other=0.0)
    width = G * R * HD
    do = tl.load(DO + s * N * width + (b * T + tq).to(tl.int64)[:, None] * width + (slot * R + head) * HD + e[None, :],
                 mask=q_mask, other=0.0)
    lse = tl.load(Lse + row_off + tq, mask=tq_ok, other=0.0)
    delta = tl.load(Delta + row_off + tq, mask=tq_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, HD_P), tl.float32)
    end = tl.minimum((q_tile + 1) * BLOCK_M, T)
    for k0 in range(_first_key(q_tile, window, BLOCK_M, BLOCK_N, HAS_WINDOW), end, BLOCK_N):
        tk = k0 + tl.arange(0, BLOCK_N)
        tk_ok = tk < T
        kv_mask = tk_ok[:, None] & e_ok[None, :]
        k = tl.load(K + kv_off + tk.to(tl.int64)[:, None] * HD + e[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off + tk.to(tl.int64)[:, None] * HD + e[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = _visible(tq, tk, tk_ok, b, T, KeyMask, window, HAS_PAD, HAS_WINDOW) & tq_ok[:, None]
        p = tl.where(visible, tl.exp(scores - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + q_ptrs, dq * scale, mask=q_mask)


def _flash_block(dt: torch.dtype) -> int:
    # 64x64 on a GPU for 16-bit inputs (fp32 ieee dots need half), 32x32 in the interpreter
    return 32 if INTERPRET or dt == torch.float32 else 64


class _Units(NamedTuple):
    """How the gathered products (:mod:`._gathered`) see one weight: its kept units per sample
    (``units``, ``count``) of ``R`` rows each, where their columns sit in the slot-space buffers
    (``a_units``; None: unit j at columns j*R..) and, per unit of the weight, its slot-space unit or
    -1 (``pos``, for the weight gradients). ``slot``: the keep_idx slot of each listed unit (None:
    unit j is slot j), for unit_scale."""
    units: torch.Tensor
    count: torch.Tensor
    R: int
    a_units: Optional[torch.Tensor]
    pos: torch.Tensor
    slot: Optional[torch.Tensor]

    def scales(self, unit_scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """unit_scale (S, G), aligned with keep_idx, as the scale of each listed unit."""
        if unit_scale is None or self.slot is None:
            return unit_scale
        return unit_scale.gather(1, self.slot)


def _by_group(keep_idx, keep_count, R: int, pos: torch.Tensor) -> _Units:
    """The units are the kept groups, R rows each (every head of a kept group); pos from
    :func:`._gathered.slot_positions`."""
    return _Units(keep_idx, keep_count, R, None, pos, None)


def _by_block(kept: torch.Tensor, keep_idx, keep_count, HD: int) -> tuple[_Units, torch.Tensor]:
    """The units are hd-row blocks (a head's rows): ``kept (S, G, k)`` bool says which of the k blocks
    of group g sample s computes, by original group. Returns the units and the (S, G, k) flags in
    slot order (False past keep_count). Device ops only, no host sync."""
    S, G, k = kept.shape
    dev = kept.device
    live = torch.arange(G, device=dev) < keep_count[:, None]
    idx = keep_idx.long().clamp(0, G - 1)  # entries past keep_count are never read; clamped, they gather safely
    in_slots = kept.gather(1, idx[:, :, None].expand(S, G, k)) & live[:, :, None]
    a_units, count = reference.mask_to_index(in_slots.reshape(S, G * k))
    a = a_units.long()
    units = (idx.gather(1, a // k) * k + a % k).to(torch.int32)
    slot = slot_positions(keep_idx, keep_count).long()[:, :, None]
    pos = torch.where((slot >= 0) & kept, slot * k + torch.arange(k, device=dev), -1)
    return _Units(units, count, HD, a_units, pos.reshape(S, G * k).to(torch.int32), a // k), in_slots


def _units(head_keep, keep_idx, keep_count, R: int, HD: int, with_qkv: bool):
    """(units of w_o_t, units of w_qkv or None, the (S, G*R) uint8 slot-order head flags the kernels
    read or None): by group without head_keep, by head block with it (a group's key and value
    blocks kept when it keeps a query head)."""
    rows = (R + 2) * HD
    if head_keep is None:
        pos = slot_positions(keep_idx, keep_count)
        return (_by_group(keep_idx, keep_count, R * HD, pos),
                _by_group(keep_idx, keep_count, rows, pos) if with_qkv else None, None)
    o_units, in_slots = _by_block(head_keep, keep_idx, keep_count, HD)
    qkv_units = None
    if with_qkv:
        kv = head_keep.any(-1, keepdim=True)
        qkv_units = _by_block(torch.cat((head_keep, kv, kv), -1), keep_idx, keep_count, HD)[0]
    S, G, _ = head_keep.shape
    return o_units, qkv_units, in_slots.reshape(S, G * R).to(torch.uint8).contiguous()


def _masking(x, position_ids, attention_mask, window):
    """(position_ids contiguous or None, attention_mask as contiguous uint8 or None, window: 0 for
    none, a window of T or more being none)."""
    T = x.shape[2]
    pos = None if position_ids is None else position_ids.contiguous()
    keys = None if attention_mask is None else attention_mask.contiguous().view(torch.uint8)
    return pos, keys, (0 if window >= T else window)


def _project_and_attend(x, w_qkv, cos, sin, keep_idx, keep_count, b_qkv, q_norm, k_norm, norm_eps, scale,
                        for_backward: bool, pos=None, keys=None, window=0, heads=None):
    """Kernels 1 and 2: q/k/v of the kept groups and the attention output o ``(S, N, G*r*hd)``.
    For the backward also the projections before the q/k norm (when there is one) and the
    per-row log-sum-exp, and every buffer zero-filled (pruned slots then read as zeros).
    ``heads``: the (S, G*r) uint8 slot-order head flags of head_keep, or None (every head)."""
    S, B, T, D = x.shape
    G, rows, _ = w_qkv.shape
    HD = cos.shape[-1]
    R = rows // HD - 2
    N = B * T
    dt, dev = x.dtype, x.device
    alloc = torch.zeros if for_backward else torch.empty
    q = alloc((S, G, R, N, HD), dtype=dt, device=dev)
    k = alloc((S, G, N, HD), dtype=dt, device=dev)
    v = alloc((S, G, N, HD), dtype=dt, device=dev)
    o = alloc((S, N, G * R * HD), dtype=dt, device=dev)
    store_pre = for_backward and (q_norm is not None or k_norm is not None)
    pre = torch.zeros((S, G, R + 1, N, HD), dtype=dt, device=dev) if store_pre else None
    lse = torch.zeros((S, G, R, N), dtype=torch.float32, device=dev) if for_backward else None
    cos, sin = cos.to(dt).contiguous(), sin.to(dt).contiguous()
    precision = dot_precision(dt)
    dummy = w_qkv  # placeholder pointer for absent optional tensors
    cfg = gemm_config(dt, N)
    _qkv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), G * (R + 2), S)](
        x, w_qkv, dummy if b_qkv is None else b_qkv.contiguous(),
        dummy if q_norm is None else q_norm.contiguous(), dummy if k_norm is None else k_norm.contiguous(),
        cos, sin, keep_idx if pos is None else pos, keep_idx, keep_count, keep_count if heads is None else heads,
        q, k, v, dummy if pre is None else pre, N, T, cos.shape[0], D, G, R, HD, norm_eps,
        HAS_BIAS=b_qkv is not None, HAS_QNORM=q_norm is not None, HAS_KNORM=k_norm is not None, STORE_PRE=store_pre,
        HAS_POS=pos is not None, HAS_HEAD_KEEP=heads is not None, R_P=next_pow2(R),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_K"], HALF_P=max(16, next_pow2(HD // 2)), PRECISION=precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    block = _flash_block(dt)
    _flash_kernel[(triton.cdiv(T, block), B * G * R, S)](
        q, k, v, o, o if lse is None else lse, keep_count, keep_count if keys is None else keys,
        keep_count if heads is None else heads, B, T, G, R, HD, scale, window, STORE_LSE=lse is not None,
        HAS_PAD=keys is not None, HAS_WINDOW=window > 0, HAS_HEAD_KEEP=heads is not None, R_P=next_pow2(R),
        BLOCK_M=block, BLOCK_N=block, HD_P=max(16, next_pow2(HD)), PRECISION=precision,
        num_warps=4, num_stages=1 if INTERPRET else 2)
    return q, k, v, o, pre, lse


def _check_head_dim(HD: int) -> None:
    if HD % 2:
        raise ValueError(f"masked_attention: rotate-half RoPE needs an even head_dim, got {HD} (cos.shape[-1])")


def _forward(x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv, q_norm, k_norm, unit_scale, norm_eps, scale,
             position_ids=None, attention_mask=None, window=0, head_keep=None):
    S, B, T, D = x.shape
    G, rows, _ = w_qkv.shape
    HD = cos.shape[-1]
    R = rows // HD - 2
    _check_head_dim(HD)
    if S == 0 or B * T == 0:
        return torch.empty_like(x)
    x = x.contiguous()
    keep_idx, keep_count = keep_idx.contiguous(), keep_count.contiguous()
    pos, keys, window = _masking(x, position_ids, attention_mask, window)
    o_units, _, heads = _units(head_keep, keep_idx, keep_count, R, HD, with_qkv=False)
    o = _project_and_attend(x, w_qkv.contiguous(), cos, sin, keep_idx, keep_count, b_qkv, q_norm, k_norm, norm_eps,
                            scale, for_backward=False, pos=pos, keys=keys, window=window, heads=heads)[3]
    y = gathered_rows_product(o, w_o_t.contiguous().view(G * R * HD, D), o_units.units, o_units.count, o_units.R,
                              x.dtype, o_units.scales(None if unit_scale is None else unit_scale.contiguous()),
                              a_units=o_units.a_units)
    return y.view(S, B, T, D)


def _rope_transposed(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient through rotate-half RoPE: its transpose applied to g (..., N, hd)."""
    half = g.shape[-1] // 2
    lo, hi = g[..., :half], g[..., half:]
    return torch.cat((lo * cos[:, :half] + hi * sin[:, half:], hi * cos[:, half:] - lo * sin[:, :half]), dim=-1)


def _head_norm_backward(g, pre, weight, eps, dtype):
    """Per-head RMSNorm ``weight * round(pre * rstd)``: (gradient of pre, gradient of weight)."""
    rstd = torch.rsqrt(pre.pow(2).mean(-1, keepdim=True) + eps)
    xhat = pre * rstd
    dweight = (g * xhat.to(dtype).float()).reshape(-1, g.shape[-1]).sum(0)
    dn = g * weight.float()
    return rstd * (dn - xhat * (dn * xhat).mean(-1, keepdim=True)), dweight


def _backward(grad_out, x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv, q_norm, k_norm, unit_scale, norm_eps,
              scale, position_ids, attention_mask, window, head_keep, output_mask):
    S, B, T, D = x.shape
    G, rows, _ = w_qkv.shape
    HD = cos.shape[-1]
    R = rows // HD - 2
    N, RHD = B * T, R * HD
    dt, dev = x.dtype, x.device
    need_x, need_wqkv, need_wo = output_mask[:3]
    need_b, need_qn, need_kn, need_scale = (bool(w) and t is not None for w, t in
                                            zip(output_mask[3:], (b_qkv, q_norm, k_norm, unit_scale)))
    empty = lambda: x.new_empty(0)  # noqa: E731  (a fresh tensor per output: outputs must not alias)
    if S == 0 or N == 0:
        zeros = lambda wanted, t: torch.zeros_like(t) if wanted else empty()  # noqa: E731
        return (zeros(need_x, x), zeros(need_wqkv, w_qkv), zeros(need_wo, w_o_t), zeros(need_b, b_qkv),
                zeros(need_qn, q_norm), zeros(need_kn, k_norm), zeros(need_scale, unit_scale))
    x = x.contiguous()
    xs = x.view(S, N, D)
    dy = grad_out.to(dt).contiguous().view(S, N, D)
    keep_idx, keep_count = keep_idx.contiguous(), keep_count.contiguous()
    wqkv, wot = w_qkv.contiguous(), w_o_t.contiguous()
    pos_ids, keys, window = _masking(x, position_ids, attention_mask, window)
    o_units, qkv_units, heads = _units(head_keep, keep_idx, keep_count, R, HD, with_qkv=True)
    q, k, v, o, pre, lse = _project_and_attend(x, wqkv, cos, sin, keep_idx, keep_count, b_qkv, q_norm, k_norm,
                                               norm_eps, scale, for_backward=True, pos=pos_ids, keys=keys,
                                               window=window, heads=heads)
    d_att = gathered_projection(dy, wot.view(G * RHD, D), o_units.units, o_units.count, o_units.R,
                                a_units=o_units.a_units)  # (S, N, G*RHD), zeros for pruned heads
    o_scaled, dscale = o, empty()
    if unit_scale is not None:
        kept = torch.arange(G, device=dev) < keep_count[:, None]
        if need_scale:
            dscale = (o.float() * d_att.float()).view(S, N, G, RHD).sum((1, 3))
            dscale = torch.where(kept, dscale, 0.0).to(unit_scale.dtype)
        a = torch.where(kept, unit_scale.float(), 0.0).repeat_interleave(RHD, dim=1)[:, None, :]
        d_att = (d_att.float() * a).to(dt)
        o_scaled = (o.float() * a).to(dt)
    dwo = unit_weight_grad(o_scaled, dy, o_units.pos, o_units.R).view(G, RHD, D).to(w_o_t.dtype) if need_wo \
        else empty()
    if not (need_x or need_wqkv or need_b or need_qn or need_kn):
        return empty(), empty(), dwo, empty(), empty(), empty(), dscale

    delta = (o.float() * d_att.float()).view(S, N, G, R, HD).sum(-1).permute(0, 2, 3, 1).contiguous()  # (S, G, R, N)
    dq = torch.zeros((S, G, R, N, HD), dtype=torch.float32, device=dev)
    dk = torch.zeros((S, G, N, HD), dtype=torch.float32, device=dev)
    dv = torch.zeros_like(dk)
    block = _flash_block(dt)
    # two fp32 (block x hd) accumulators per program (dK and dV): eight warps on a GPU, as FlashAttention-2
    common = dict(BLOCK_M=block, BLOCK_N=block, HD_P=max(16, next_pow2(HD)), PRECISION=dot_precision(dt),
                  num_warps=4 if INTERPRET else 8, num_stages=1 if INTERPRET else 2)
    masks = dict(HAS_PAD=keys is not None, HAS_WINDOW=window > 0, HAS_HEAD_KEEP=heads is not None, R_P=next_pow2(R))
    key_mask = keep_count if keys is None else keys
    head_flags = keep_count if heads is None else heads
    _flash_dkdv_kernel[(triton.cdiv(T, block), B * G, S)](q, k, v, d_att, lse, delta, dk, dv, keep_count, key_mask,
                                                          head_flags, B, T, G, R, HD, scale, window, **masks, **common)
    _flash_dq_kernel[(triton.cdiv(T, block), B * G * R, S)](q, k, v, d_att, lse, delta, dq, keep_count, key_mask,
                                                            head_flags, B, T, G, R, HD, scale, window, **masks,
                                                            **common)
    if pos_ids is None:  # (N, hd): row n is position n % T
        cos_n, sin_n = cos[:T].float().repeat(B, 1), sin[:T].float().repeat(B, 1)
    else:  # row n is position_ids.flatten()[n] (clamped as the forward kernel does)
        rows_n = pos_ids.reshape(-1).long().clamp(0, cos.shape[0] - 1)
        cos_n, sin_n = cos.float().index_select(0, rows_n), sin.float().index_select(0, rows_n)
    dq, dk = _rope_transposed(dq, cos_n, sin_n), _rope_transposed(dk, cos_n, sin_n)
    dqn, dkn = empty(), empty()
    if q_norm is not None:
        dq, dqn = _head_norm_backward(dq, pre[:, :, :R].float(), q_norm, norm_eps, dt)
        dqn = dqn.to(q_norm.dtype) if need_qn else empty()
    if k_norm is not None:
        dk, dkn = _head_norm_backward(dk, pre[:, :, R].float(), k_norm, norm_eps, dt)
        dkn = dkn.to(k_norm.dtype) if need_kn else empty()
    # slot space in w_qkv's row order: per kept group, its r query heads, then k, then v
    dpre = torch.cat((dq.permute(0, 3, 1, 2, 4), dk.permute(0, 2, 1, 3)[:, :, :, None],
                      dv.permute(0, 2, 1, 3)[:, :, :, None]), dim=3).reshape(S, N, G * rows).to(dt)
    u = qkv_units
    db = unit_bias_grad(dpre, u.pos, u.R).view(G, rows).to(b_qkv.dtype) if need_b else empty()
    dx = gathered_rows_product(dpre, wqkv.view(G * rows, D), u.units, u.count, u.R, dt,
                               a_units=u.a_units).view(S, B, T, D) if need_x else empty()
    dwqkv = unit_weight_grad(dpre, xs, u.pos, u.R).view(G, rows, D).to(w_qkv.dtype) if need_wqkv else empty()
    return dx, dwqkv, dwo, db, dqn, dkn, dscale


@torch.library.custom_op("bpp_triton::masked_attention", mutates_args=())
def _masked_attention_op(x: torch.Tensor, w_qkv: torch.Tensor, w_o_t: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, keep_idx: torch.Tensor, keep_count: torch.Tensor,
                         b_qkv: Optional[torch.Tensor], q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor],
                         unit_scale: Optional[torch.Tensor], norm_eps: float, scale: float,
                         position_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                         window: int = 0, head_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _forward(x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv, q_norm, k_norm, unit_scale, norm_eps,
                    scale, position_ids, attention_mask, window, head_keep)


@torch.library.custom_op("bpp_triton::masked_attention_backward", mutates_args=())
def _masked_attention_backward_op(
        grad_out: torch.Tensor, x: torch.Tensor, w_qkv: torch.Tensor, w_o_t: torch.Tensor, cos: torch.Tensor,
        sin: torch.Tensor, keep_idx: torch.Tensor, keep_count: torch.Tensor, b_qkv: Optional[torch.Tensor],
        q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor], unit_scale: Optional[torch.Tensor],
        norm_eps: float, scale: float, position_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
        window: int, head_keep: Optional[torch.Tensor], output_mask: List[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv, q_norm, k_norm, unit_scale,
                     norm_eps, scale, position_ids, attention_mask, window, head_keep, output_mask)


_autograd.masked_attention(_masked_attention_op, _masked_attention_backward_op)


def masked_attention(x: torch.Tensor, w_qkv: torch.Tensor, w_o_t: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, keep_idx: torch.Tensor, keep_count: torch.Tensor,
                     b_qkv: torch.Tensor | None = None, q_norm: torch.Tensor | None = None,
                     k_norm: torch.Tensor | None = None, norm_eps: float = 1e-6,
                     scale: float | None = None, unit_scale: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                     window: int | None = None, head_keep: torch.Tensor | None = None) -> torch.Tensor:
    """x ``(S, B, T, d)``; w_qkv ``(G, (r+2)*hd, d)``; w_o_t ``(G, r*hd, d)``; cos/sin ``(P, hd)``;
    keep_idx ``(S, G)`` int32; keep_count ``(S,)`` int32; optional b_qkv, q_norm/k_norm, unit_scale
    ``(S, G)``, position_ids ``(B, T)`` (cos/sin rows; None: 0..T-1), attention_mask ``(B, T)``
    bool (keys to attend), window (query t sees key s only if t - s < window; None: no window),
    head_keep ``(S, G, r)`` bool (query head j of group g kept for sample s; None: every head).
    Returns the o_proj output ``(S, B, T, d)`` in x's dtype (zeros where nothing is kept).
    Differentiable in x, the weights, the bias, the norms and unit_scale (not cos/sin)."""
    _check_head_dim(cos.shape[-1])
    scale = cos.shape[-1] ** -0.5 if scale is None else float(scale)
    if position_ids is None and attention_mask is None and window is None and head_keep is None:
        return _masked_attention_op(x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv, q_norm, k_norm,
                                    unit_scale, float(norm_eps), scale)  # the call as it always was
    return _masked_attention_op(x, w_qkv, w_o_t, cos, sin, keep_idx, keep_count, b_qkv, q_norm, k_norm, unit_scale,
                                float(norm_eps), scale, position_ids, attention_mask,
                                0 if window is None else int(window), None if head_keep is None else head_keep.contiguous())
