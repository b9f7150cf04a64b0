"""Plain-PyTorch ground truth for every bpp_kernels op.

Every fast backend (C++ on CPU, Triton on CUDA) is tested against these functions. They
are written for clarity: a Python loop over samples, each sample gathering only its kept
units, so the work of pruned units is skipped here too (never multiplied by zero) and a
sample's result never depends on the other samples of the batch.

Layouts (built once by :mod:`bpp_kernels.layout`):

- MLP: ``w_gate_up (m, 2, d)`` interleaves row j of W_gate and W_up; ``w_down_t (m, d)`` is
  W_down transposed, so keeping channel j means reading row j of both (a row gather). The
  non-gated MLP (OPT, GPT-2, Pythia) takes ``w_up (m, d)``, ``b_up (m,)`` and the same
  ``w_down_t``.
- Attention, per KV group g (G groups, r = query heads per group, hd = head_dim):
  ``w_qkv (G, (r + 2) * hd, d)`` holds the r query heads of g, then its key head, then its
  value head; ``b_qkv (G, (r + 2) * hd)`` the matching biases; ``w_o_t (G, r * hd, d)`` the
  columns of W_o that read the group's heads, transposed. Query head h belongs to group
  h // r, as in Hugging Face's ``repeat_kv``.
- Masks as index lists: ``keep_idx (S, n) int32`` is a permutation of 0..n-1 per sample with
  the kept units first (ascending), ``keep_count (S,) int32`` says how many are kept.
- Per-unit scales (soft masks): ``unit_scale (S, n)`` floating, aligned with ``keep_idx``:
  ``unit_scale[s, j]`` multiplies the output of unit ``keep_idx[s, j]`` for ``j < keep_count[s]``
  (an MLP channel's activation before W_down; a KV group's attention output, all r query heads
  of it, before W_o). Entries at ``j >= keep_count[s]`` are never read and get zero gradient.
  ``None`` (a hard mask) is the same as all ones.
- Query heads inside KV groups (attention only): ``head_keep (S, G, r) bool``, indexed by the
  original group g and head j of the group (not by slot): query head j of group g contributes to
  sample s only if g is kept and ``head_keep[s, g, j]``; None keeps every head of a kept group.

Differentiable: every function here is plain autograd (``torch.autograd.gradcheck`` runs on
them in float64). :func:`linear_cross_entropy` keeps every chunk's logits for its backward
here; the C++ and Triton backends recompute them chunk by chunk instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_to_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask (S, n) bool`` -> ``keep_idx (S, n) int32`` (kept first, ascending), ``keep_count (S,) int32``."""
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    return order.to(torch.int32), mask.sum(dim=1, dtype=torch.int32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 (float64 stays float64) and cast back (as
    Hugging Face Llama does): ``weight * normed`` in the dtype weight and x promote to, then
    converted to ``out_dtype`` when given."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(x.dtype)
    return y if out_dtype is None else y.to(out_dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x.to(residual.dtype) + residual`` (in residual's dtype); returns
    ``(rms_norm(h, weight, eps, out_dtype), h)``."""
    h = x.to(residual.dtype) + residual
    return rms_norm(h, weight, eps, out_dtype), h


# the gate activations of masked_swiglu: "silu" is SwiGLU (Llama), "gelu_tanh" GeGLU (Gemma)
GLU_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
}


def check_activation(activation: str, op: str = "masked_swiglu") -> None:
    """A ValueError unless ``activation`` is one of :data:`GLU_ACTIVATIONS`."""
    if activation not in GLU_ACTIVATIONS:
        raise ValueError(f"{op}: activation must be {' or '.join(map(repr, GLU_ACTIVATIONS))}, got {activation!r}")


def masked_swiglu(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down_t: torch.Tensor,
    keep_idx: torch.Tensor,
    keep_count: torch.Tensor,
    unit_scale: torch.Tensor | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """Gated MLP of sample s over its kept channels only: ``down(act(gate x) * up x)``.

    x ``(S, ..., d)``; w_gate_up ``(m, 2, d)``; w_down_t ``(m, d)``; keep_idx ``(S, m)``;
    keep_count ``(S,)``; unit_scale ``(S, m)`` or None: the j-th kept channel's activation is
    multiplied by ``unit_scale[s, j]`` (in x's dtype); activation ``"silu"`` (SwiGLU) or
    ``"gelu_tanh"`` (GeGLU, tanh-approximated GELU). Returns ``(S, ..., d)`` in x's dtype;
    zeros where nothing is kept.
    """
    check_activation(activation)
    act_fn = GLU_ACTIVATIONS[activation]
    S, d = x.shape[0], x.shape[-1]
    out = torch.zeros_like(x)
    counts = keep_count.tolist()
    for s in range(S):
        c = counts[s]
        if c == 0:
            continue
        k = keep_idx[s, :c].long()
        xs = x[s].reshape(-1, d)
        gu = (xs @ w_gate_up[k].reshape(2 * c, d).t()).view(-1, c, 2)
        act = act_fn(gu[..., 0]) * gu[..., 1]
        if unit_scale is not None:
            act = act * unit_scale[s, :c].to(act.dtype)
        out[s] = (act @ w_down_t[k]).view(x.shape[1:])
    return _connected(out, x, w_gate_up, w_down_t, unit_scale)


ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


def activation_fn(z: torch.Tensor, activation: str) -> torch.Tensor:
    """The MLP activations of :func:`masked_mlp`: ``gelu`` (exact, with erf: Pythia / GPT-NeoX),
    ``gelu_tanh`` (the tanh approximation: GPT-2's ``gelu_new``), ``relu`` (OPT)."""
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "relu":
        return F.relu(z)
    raise ValueError(f"activation={activation!r} is not one of {', '.join(ACTIVATIONS)}")


def masked_mlp(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    keep_idx: torch.Tensor,
    keep_count: torch.Tensor,
    b_up: torch.Tensor | None = None,
    activation: str = "gelu",
    unit_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-gated MLP (OPT, GPT-2, Pythia) of sample s over its kept channels only, without the
    down projection's bias (the caller adds it).

    x ``(S, ..., d)``; w_up ``(m, d)``; w_down_t ``(m, d)`` (W_down transposed); keep_idx
    ``(S, m)``; keep_count ``(S,)``; b_up ``(m,)`` or None; activation one of
    :data:`ACTIVATIONS`; unit_scale ``(S, m)`` or None: the j-th kept channel's activation is
    multiplied by ``unit_scale[s, j]`` (in x's dtype). Returns ``(S, ..., d)`` in x's dtype;
    zeros where nothing is kept.
    """
    S, d = x.shape[0], x.shape[-1]
    out = torch.zeros_like(x)
    counts = keep_count.tolist()
    for s in range(S):
        c = counts[s]
        if c == 0:
            continue
        k = keep_idx[s, :c].long()
        z = x[s].reshape(-1, d) @ w_up[k].t()
        if b_up is not None:
            z = z + b_up[k]
        act = activation_fn(z, activation)
        if unit_scale is not None:
            act = act * unit_scale[s, :c].to(act.dtype)
        out[s] = (act @ w_down_t[k]).view(x.shape[1:])
    return _connected(out, x, w_up, w_down_t, b_up, unit_scale)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim as ``torch.nn.functional.layer_norm`` computes it: mean and
    (biased) variance in fp32 (float64 stays float64), the affine map too, one rounding to x's
    dtype at the end. weight ``(d,)``, bias ``(d,)`` or None."""
    wide = torch.promote_types(x.dtype, torch.float32)
    h = x.to(wide)
    mean = h.mean(-1, keepdim=True)
    centred = h - mean
    y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * weight.to(wide)
    if bias is not None:
        y = y + bias.to(wide)
    return y.to(x.dtype)


def _connected(out: torch.Tensor, *inputs: torch.Tensor | None) -> torch.Tensor:
    """``out`` joined to the autograd graph of every input that needs a gradient, through an empty
    slice: a batch that keeps no unit then gives zero gradients (as the C++ and Triton backends
    do), never ``None`` or an output without a graph."""
    for t in inputs:
        if t is not None and t.requires_grad:
            out = out + t.reshape(-1)[:0].sum().to(out.dtype)
    return out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in Hugging Face's rotate-half convention; cos/sin ``(..., T, hd)`` broadcast
    over x's leading dims."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_visibility(T: int, attention_mask: torch.Tensor | None = None, window: int | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """``visible (B or 1, T, T) bool``: query t sees key s iff ``s <= t`` (causal), ``t - s < window``
    (Hugging Face's ``sliding_window_overlay``: ``kv_idx > q_idx - sliding_window``; None: no window)
    and ``attention_mask[b, s]`` (a key padding mask, True = a real token; None: no padding)."""
    t = torch.arange(T, device=device)
    visible = t[None, :] <= t[:, None]
    if window is not None:
        visible = visible & (t[:, None] - t[None, :] < window)
    visible = visible.unsqueeze(0)
    if attention_mask is not None:
        visible = visible & attention_mask[:, None, :].to(torch.bool)
    return visible


def _masked_softmax_attention(q, k, v, visible, scale):
    """``softmax(q k^T * scale)`` over the visible keys only, times v; a query row that sees no key
    gets zeros (and passes no gradient). visible broadcasts to ``(B, heads, T, T)``."""
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    sees_any = visible.any(-1, keepdim=True)
    scores = torch.where(sees_any, scores, 0.0)  # a row with no visible key: finite, zeroed below
    p = torch.softmax(scores, dim=-1) * visible
    return p @ v


def masked_attention(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    w_o_t: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keep_idx: torch.Tensor,
    keep_count: torch.Tensor,
    b_qkv: torch.Tensor | None = None,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    scale: float | None = None,
    unit_scale: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    window: int | None = None,
    head_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal GQA self-attention of sample s over its kept KV groups only, through W_o.

    x ``(S, B, T, d)`` (already normalised); w_qkv ``(G, (r+2)*hd, d)``; w_o_t ``(G, r*hd, d)``;
    cos/sin ``(P, hd)`` of any floating dtype, used in x's dtype; keep_idx ``(S, G)``; keep_count
    ``(S,)``; optional b_qkv ``(G, (r+2)*hd)``, q_norm/k_norm ``(hd,)`` (per-head RMSNorm before RoPE, Qwen3);
    ``scale`` is the softmax scale (default hd**-0.5); unit_scale ``(S, G)`` or None multiplies
    the attention output of the j-th kept group's r query heads by ``unit_scale[s, j]``.
    position_ids ``(B, T)`` integer or None: token (b, t) is rotated by row ``position_ids[b, t]`` of
    cos/sin (None: row t, P >= T). attention_mask ``(B, T)`` bool or None: keys where it is False
    are never attended. window int or None: query t sees key s only if ``t - s < window``
    (:func:`attention_visibility`). A query row that sees no key gets zeros.
    head_keep ``(S, G, r)`` bool or None: query head j of kept group g contributes only where
    ``head_keep[s, g, j]``; here its attention output is computed and zeroed before W_o (the
    specification: the fast backends skip it).
    Returns the o_proj output ``(S, B, T, d)`` (no residual); zeros where nothing is kept.
    """
    S, B, T, d = x.shape
    G, rows, _ = w_qkv.shape
    hd = cos.shape[-1]
    r = rows // hd - 2
    scale = hd**-0.5 if scale is None else scale
    out = torch.zeros_like(x)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if position_ids is None:
        cos, sin = cos[:T], sin[:T]  # (T, hd): broadcast over batch and heads
    else:
        pos = position_ids.long()
        cos, sin = cos[pos][:, None], sin[pos][:, None]  # (B, 1, T, hd): broadcast over heads
    masked = attention_mask is not None or window is not None
    visible = attention_visibility(T, attention_mask, window, x.device)[:, None] if masked else None  # (B|1, 1, T, T)
    counts = keep_count.tolist()
    for s in range(S):
        c = counts[s]
        if c == 0:
            continue
        k = keep_idx[s, :c].long()
        qkv = x[s] @ w_qkv[k].reshape(c * rows, d).t()  # (B, T, c*(r+2)*hd)
        if b_qkv is not None:
            qkv = qkv + b_qkv[k].reshape(-1)
        qkv = qkv.view(B, T, c, r + 2, hd)
        q = qkv[:, :, :, :r].reshape(B, T, c * r, hd).transpose(1, 2)  # (B, c*r, T, hd)
        kk = qkv[:, :, :, r].transpose(1, 2)  # (B, c, T, hd)
        v = qkv[:, :, :, r + 1].transpose(1, 2)
        if q_norm is not None:
            q = rms_norm(q, q_norm, norm_eps)
        if k_norm is not None:
            kk = rms_norm(kk, k_norm, norm_eps)
        q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)
        kk = kk.repeat_interleave(r, dim=1)
        v = v.repeat_interleave(r, dim=1)
        if masked:
            att = _masked_softmax_attention(q, kk, v, visible, scale)
        else:
            att = F.scaled_dot_product_attention(q, kk, v, is_causal=True, scale=scale)
        if unit_scale is not None:
            att = att * unit_scale[s, :c].to(att.dtype).repeat_interleave(r).view(1, c * r, 1, 1)
        if head_keep is not None:  # the kept groups' heads, in the order of q's heads
            att = att * head_keep[s, k].reshape(1, c * r, 1, 1).to(att.dtype)
        att = att.transpose(1, 2).reshape(B, T, c * r * hd)
        out[s] = att @ w_o_t[k].reshape(c * r * hd, d)
    return _connected(out, x, w_qkv, w_o_t, b_qkv, q_norm, k_norm, unit_scale)


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Per-row cross-entropy of ``h @ weight.T`` without holding all logits at once.

    h ``(N, d)``; weight ``(V, d)``; target ``(N,)`` int64. Logits are computed in h's dtype,
    the loss in fp32 (float64 for float64 h). Returns ``(N,)`` float32 (float64); rows whose
    target is ignore_index get 0.
    """
    N = h.shape[0]
    wide = torch.promote_types(h.dtype, torch.float32)  # float64 stays float64 (gradcheck)
    loss = torch.zeros(N, dtype=wide, device=h.device)
    for start in range(0, N, chunk_size):
        rows = slice(start, min(start + chunk_size, N))
        logits = (h[rows] @ weight.t()).to(wide)
        t = target[rows]
        valid = t != ignore_index
        picked = logits.gather(1, t.clamp_min(0).unsqueeze(1)).squeeze(1)
        loss[rows] = torch.where(valid, torch.logsumexp(logits, dim=1) - picked, 0.0)
    return loss
