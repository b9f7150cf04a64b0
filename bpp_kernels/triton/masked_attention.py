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
3. ``_o_proj_kernel`` (row tile, output tile, sample): reduces over the kept heads' features only,
   gathering rows of ``w_o_t (G, r*hd, d)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, dot_precision, gemm_config, next_pow2


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
def _qkv_kernel(X, Wqkv, Bqkv, QNorm, KNorm, Cos, Sin, KeepIdx, KeepCount, Q, K, V,
                N, T, D, G, R, HD, eps,
                HAS_BIAS: tl.constexpr, HAS_QNORM: tl.constexpr, HAS_KNORM: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HALF_P: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.program_id(1) // (R + 2)
    head = tl.program_id(1) % (R + 2)  # 0..R-1: query heads, R: key, R+1: value
    s = tl.program_id(2).to(tl.int64)
    count = tl.load(KeepCount + s)
    if slot >= count:
        return
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
    if HAS_QNORM:
        if is_query:
            acc_lo, acc_hi = _head_rms_norm(acc_lo, acc_hi, QNorm, e, e_ok, half, HD, eps, dtype)
    if HAS_KNORM:
        if is_key:
            acc_lo, acc_hi = _head_rms_norm(acc_lo, acc_hi, KNorm, e, e_ok, half, HD, eps, dtype)
    t = (rows % T).to(tl.int64)
    mask2 = row_ok[:, None] & e_ok[None, :]
    if head <= R:  # RoPE on queries and keys
        cos_lo = tl.load(Cos + t[:, None] * HD + e[None, :], mask=mask2, other=0.0).to(tl.float32)
        cos_hi = tl.load(Cos + t[:, None] * HD + half + e[None, :], mask=mask2, other=0.0).to(tl.float32)
        sin_lo = tl.load(Sin + t[:, None] * HD + e[None, :], mask=mask2, other=0.0).to(tl.float32)
        sin_hi = tl.load(Sin + t[:, None] * HD + half + e[None, :], mask=mask2, other=0.0).to(tl.float32)
        rot_lo = acc_lo * cos_lo - acc_hi * sin_lo
        rot_hi = acc_hi * cos_hi + acc_lo * sin_hi
        acc_lo, acc_hi = rot_lo, rot_hi
    row64 = rows.to(tl.int64)[:, None]
    if is_query:
        base = Q + ((s * G + slot) * R + head) * N * HD
    elif is_key:
        base = K + (s * G + slot) * N * HD
    else:
        base = V + (s * G + slot) * N * HD
    tl.store(base + row64 * HD + e[None, :], acc_lo.to(dtype), mask=mask2)
    tl.store(base + row64 * HD + half + e[None, :], acc_hi.to(dtype), mask=mask2)


@triton.jit
def _flash_kernel(Q, K, V, O, KeepCount, B, T, G, R, HD, scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HD_P: tl.constexpr, PRECISION: tl.constexpr):
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    s = tl.program_id(2).to(tl.int64)
    b = bh // (G * R)
    slot = (bh // R) % G
    head = bh % R
    count = tl.load(KeepCount + s)
    if slot >= count:
        return
    N = B * T
    e = tl.arange(0, HD_P)
    e_ok = e < HD
    tq = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tq_ok = tq < T
    q_base = Q + ((s * G + slot) * R + head) * N * HD + b * T * HD
    kv_off = (s * G + slot) * N * HD + b * T * HD
    q = tl.load(q_base + tq.to(tl.int64)[:, None] * HD + e[None, :], mask=tq_ok[:, None] & e_ok[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HD_P), tl.float32)
    end = tl.minimum((q_tile + 1) * BLOCK_M, T)  # causal: later keys are never needed
    for k0 in range(0, end, BLOCK_N):
        tk = k0 + tl.arange(0, BLOCK_N)
        tk_ok = tk < T
        kv_mask = tk_ok[:, None] & e_ok[None, :]
        k = tl.load(K + kv_off + tk.to(tl.int64)[:, None] * HD + e[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off + tk.to(tl.int64)[:, None] * HD + e[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = (tk[None, :] <= tq[:, None]) & tk_ok[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    feature = (slot * R + head) * HD + e
    o_base = O + s * N * (G * R * HD) + (b * T + tq).to(tl.int64)[:, None] * (G * R * HD)
    tl.store(o_base + feature[None, :], out.to(O.dtype.element_ty), mask=tq_ok[:, None] & e_ok[None, :])


@triton.jit
def _o_proj_kernel(O, Wot, KeepIdx, KeepCount, Y, N, D, G, RHD,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.program_id(2).to(tl.int64)
    row_ok = rows < N
    col_ok = cols < D
    count = tl.load(KeepCount + s)
    n_features = count * RHD
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    o_base = O + s * N * (G * RHD) + rows.to(tl.int64)[:, None] * (G * RHD)
    for f0 in range(0, n_features, BLOCK_K):
        f = f0 + tl.arange(0, BLOCK_K)
        f_ok = f < n_features
        group = tl.load(KeepIdx + s * G + f // RHD, mask=f_ok, other=0).to(tl.int64)
        a = tl.load(o_base + f[None, :], mask=row_ok[:, None] & f_ok[None, :], other=0.0)
        w = tl.load(Wot + (group * RHD + f % RHD)[:, None] * D + cols[None, :], mask=f_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc += tl.dot(a, w, input_precision=PRECISION)
    out = Y + s * N * D + rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out, acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def masked_attention(x: torch.Tensor, w_qkv: torch.Tensor, w_o_t: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, keep_idx: torch.Tensor, keep_count: torch.Tensor,
                     b_qkv: torch.Tensor | None = None, q_norm: torch.Tensor | None = None,
                     k_norm: torch.Tensor | None = None, norm_eps: float = 1e-6,
                     scale: float | None = None) -> torch.Tensor:
    """x ``(S, B, T, d)``; w_qkv ``(G, (r+2)*hd, d)``; w_o_t ``(G, r*hd, d)``; cos/sin ``(T, hd)``;
    keep_idx ``(S, G)`` int32; keep_count ``(S,)`` int32; optional b_qkv, q_norm/k_norm.
    Returns the o_proj output ``(S, B, T, d)`` in x's dtype (zeros where nothing is kept)."""
    S, B, T, D = x.shape
    G, rows, _ = w_qkv.shape
    HD = cos.shape[-1]
    R = rows // HD - 2
    N = B * T
    if HD % 2:
        raise ValueError(f"masked_attention: rotate-half RoPE needs an even head_dim, got {HD} (cos.shape[-1])")
    scale = HD**-0.5 if scale is None else float(scale)
    x = x.contiguous()
    y = torch.empty_like(x)
    if S == 0 or N == 0:
        return y
    dt = x.dtype
    q = torch.empty((S, G, R, N, HD), dtype=dt, device=x.device)
    k = torch.empty((S, G, N, HD), dtype=dt, device=x.device)
    v = torch.empty_like(k)
    o = torch.empty((S, N, G * R * HD), dtype=dt, device=x.device)
    keep_idx, keep_count = keep_idx.contiguous(), keep_count.contiguous()
    cos, sin = cos.to(dt).contiguous(), sin.to(dt).contiguous()
    precision = dot_precision(dt)
    dummy = w_qkv  # placeholder pointer for absent optional tensors
    cfg = gemm_config(dt, N)
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _qkv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), G * (R + 2), S)](
        x, w_qkv.contiguous(), dummy if b_qkv is None else b_qkv.contiguous(),
        dummy if q_norm is None else q_norm.contiguous(), dummy if k_norm is None else k_norm.contiguous(),
        cos, sin, keep_idx, keep_count, q, k, v, N, T, D, G, R, HD, norm_eps,
        HAS_BIAS=b_qkv is not None, HAS_QNORM=q_norm is not None, HAS_KNORM=k_norm is not None,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_K"], HALF_P=max(16, next_pow2(HD // 2)), PRECISION=precision,
        **launch)
    # flash tiles: 64x64 on a GPU for 16-bit inputs (fp32 ieee dots need half), 32x32 in the interpreter
    flash_block = 32 if INTERPRET or dt == torch.float32 else 64
    _flash_kernel[(triton.cdiv(T, flash_block), B * G * R, S)](
        q, k, v, o, keep_count, B, T, G, R, HD, scale,
        BLOCK_M=flash_block, BLOCK_N=flash_block, HD_P=max(16, next_pow2(HD)), PRECISION=precision,
        num_warps=4, num_stages=1 if INTERPRET else 2)
    _o_proj_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(D, cfg["BLOCK_C"]), S)](
        o, w_o_t.contiguous(), keep_idx, keep_count, y, N, D, G, R * HD,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_C"], PRECISION=precision, **launch)
    return y
