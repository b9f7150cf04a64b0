"""Random inputs for every bpp_kernels op, shared by the backend tests (Triton, C++).

Inputs are fresh random tensors per call (never zeros); masks are random with ragged kept
counts and always include an empty and a full sample when S >= 2.
"""
from __future__ import annotations

import pytest
import torch

from bpp_kernels import layout, reference

# the C++ ops' GEMM libraries (BPP_CPU_GEMM): both are tested whatever this CPU's default is
CPU_GEMMS = [pytest.param("onednn", id="onednn"), pytest.param("aten", id="mm")]


def random_mask(S: int, n: int, keep: float, generator: torch.Generator) -> torch.Tensor:
    """(S, n) bool with ragged counts; sample 0 keeps nothing and sample 1 keeps everything
    (when S >= 2 and keep is strictly between 0 and 1)."""
    mask = torch.rand(S, n, generator=generator) < keep
    if keep <= 0.0:
        return torch.zeros(S, n, dtype=torch.bool)
    if keep >= 1.0:
        return torch.ones(S, n, dtype=torch.bool)
    if S >= 2:
        mask[0] = False
        mask[1] = True
    return mask


def swiglu_inputs(S, N, d, m, keep, dtype=torch.float32, device="cpu", seed=0):
    """x (S, N, d), packed weights, keep_idx, keep_count: kwargs for masked_swiglu."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, N, d, generator=g)
    w_gate, w_up = torch.randn(m, d, generator=g) / d**0.5, torch.randn(m, d, generator=g) / d**0.5
    w_down = torch.randn(d, m, generator=g) / m**0.5
    w_gate_up, w_down_t = layout.pack_swiglu(w_gate, w_up, w_down)
    keep_idx, keep_count = reference.mask_to_index(random_mask(S, m, keep, g))
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return dict(x=to(x), w_gate_up=to(w_gate_up), w_down_t=to(w_down_t),
                keep_idx=keep_idx.to(device), keep_count=keep_count.to(device))


def rope(T, hd, base=10000.0, dtype=torch.float32, device="cpu"):
    inv = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def attention_inputs(S, B, T, d, G, r, hd, keep, dtype=torch.float32, device="cpu", seed=0,
                     bias=False, qk_norm=False):
    """kwargs for masked_attention: x (S, B, T, d), packed q/k/v/o for G groups of r query heads."""
    g = torch.Generator().manual_seed(seed)
    H = G * r
    x = torch.randn(S, B, T, d, generator=g)
    w_q = torch.randn(H * hd, d, generator=g) / d**0.5
    w_k = torch.randn(G * hd, d, generator=g) / d**0.5
    w_v = torch.randn(G * hd, d, generator=g) / d**0.5
    w_o = torch.randn(d, H * hd, generator=g) / (H * hd) ** 0.5
    biases = [0.1 * torch.randn(n, generator=g) for n in (H * hd, G * hd, G * hd)] if bias else [None] * 3
    w_qkv, w_o_t, b_qkv = layout.pack_attention(w_q, w_k, w_v, w_o, G, *biases)
    keep_idx, keep_count = reference.mask_to_index(random_mask(S, G, keep, g))
    cos, sin = rope(T, hd, dtype=dtype, device=device)
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    out = dict(x=to(x), w_qkv=to(w_qkv), w_o_t=to(w_o_t), cos=cos, sin=sin,
               keep_idx=keep_idx.to(device), keep_count=keep_count.to(device), b_qkv=to(b_qkv))
    if qk_norm:
        out["q_norm"] = to(1.0 + 0.2 * torch.randn(hd, generator=g))
        out["k_norm"] = to(1.0 + 0.2 * torch.randn(hd, generator=g))
    return out


def cross_entropy_inputs(N, d, V, dtype=torch.float32, device="cpu", seed=0, n_ignored=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g)
    w = torch.randn(V, d, generator=g) / d**0.5
    target = torch.randint(0, V, (N,), generator=g)
    if n_ignored:
        target[torch.randperm(N, generator=g)[:n_ignored]] = -100
    return dict(h=h.to(device, dtype), weight=w.to(device, dtype), target=target.to(device))


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Relative RMS error ||ref - out|| / ||ref|| in fp32 (0 when both are zero)."""
    ref, out = ref.float(), out.float()
    denom = ref.norm().item()
    diff = (ref - out).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float) -> None:
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out.float()).all(), f"{name}: non-finite values"
    err = rel_err(ref, out)
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > {tol:.1e}"


def low_precision_tolerance(ref_fn, kwargs: dict, dtype: torch.dtype, floor: float = 1e-6) -> tuple[torch.Tensor, float]:
    """FlashAttention's rule: the fp32 reference output and 2x the error of the same reference
    run in ``dtype`` (the error a PyTorch implementation in that precision already makes)."""
    up = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
    ref32 = ref_fn(**up)
    ref_lp = ref_fn(**kwargs)
    return ref32, max(2.0 * rel_err(ref32, ref_lp), floor)
