"""Re-lay standard (Hugging Face shaped) weights once, so every masked op gathers rows.

See :mod:`bpp_kernels.reference` for the layouts these functions produce.
"""
from __future__ import annotations

import torch


def pack_swiglu(
    w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w_gate, w_up (m, d)``, ``w_down (d, m)`` -> ``w_gate_up (m, 2, d)``, ``w_down_t (m, d)``.

    Example::

        >>> import torch, bpp_kernels as K
        >>> w_gate, w_up, w_down = torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6)
        >>> w_gate_up, w_down_t = K.pack_swiglu(w_gate, w_up, w_down)
        >>> w_gate_up.shape, w_down_t.shape
        (torch.Size([6, 2, 4]), torch.Size([6, 4]))
        >>> torch.equal(w_gate_up[2, 1], w_up[2]) and torch.equal(w_down_t[2], w_down[:, 2])  # channel 2
        True
    """
    if w_gate.shape != w_up.shape or w_down.shape != w_gate.shape[::-1]:
        raise ValueError(
            f"pack_swiglu: expected w_gate, w_up (m, d) and w_down (d, m); got "
            f"{tuple(w_gate.shape)}, {tuple(w_up.shape)}, {tuple(w_down.shape)}"
        )
    return torch.stack((w_gate, w_up), dim=1).contiguous(), w_down.t().contiguous()


def pack_mlp(
    w_up: torch.Tensor, w_down: torch.Tensor, b_up: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Non-gated MLP (OPT ``fc1``/``fc2``, Pythia ``dense_h_to_4h``/``dense_4h_to_h``):
    ``w_up (m, d)``, ``w_down (d, m)``, optional ``b_up (m,)`` -> ``w_up (m, d)``,
    ``w_down_t (m, d)``, ``b_up (m,)`` or None, contiguous: channel j is row j of each. GPT-2's
    ``Conv1D`` stores its weights transposed (``c_fc.weight (d, m)``, ``c_proj.weight (m, d)``):
    pass ``c_fc.weight.t()`` and ``c_proj.weight.t()``. The down projection's bias is not part of
    :func:`bpp_kernels.masked_mlp`; the caller adds it.

    Example::

        >>> import torch, bpp_kernels as K
        >>> w_up, w_down, b_up = torch.randn(6, 4), torch.randn(4, 6), torch.randn(6)
        >>> w_up_p, w_down_t, b_up_p = K.pack_mlp(w_up, w_down, b_up)
        >>> w_up_p.shape, w_down_t.shape, b_up_p.shape
        (torch.Size([6, 4]), torch.Size([6, 4]), torch.Size([6]))
        >>> torch.equal(w_down_t[2], w_down[:, 2]) and K.pack_mlp(w_up, w_down)[2] is None  # channel 2; no bias
        True
    """
    if w_up.dim() != 2 or w_down.shape != w_up.shape[::-1] or (b_up is not None and b_up.shape != w_up.shape[:1]):
        raise ValueError(
            f"pack_mlp: expected w_up (m, d), w_down (d, m) and b_up (m,) or None; got {tuple(w_up.shape)}, "
            f"{tuple(w_down.shape)}, {None if b_up is None else tuple(b_up.shape)}"
        )
    return w_up.contiguous(), w_down.t().contiguous(), None if b_up is None else b_up.contiguous()


def pack_attention(
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    w_o: torch.Tensor,
    num_kv_groups: int,
    b_q: torch.Tensor | None = None,
    b_k: torch.Tensor | None = None,
    b_v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Group q/k/v/o weights by KV group.

    ``w_q (H*hd, d)``, ``w_k, w_v (G*hd, d)``, ``w_o (d, H*hd)``, optional biases of the
    matching row counts -> ``w_qkv (G, (r+2)*hd, d)``, ``w_o_t (G, r*hd, d)``,
    ``b_qkv (G, (r+2)*hd)`` or None, where r = H / G.

    Example (4 query heads in 2 KV groups, so r = 2; head size 2)::

        >>> import torch, bpp_kernels as K
        >>> d, H, G, hd = 8, 4, 2, 2
        >>> w_q, w_k, w_v = torch.randn(H * hd, d), torch.randn(G * hd, d), torch.randn(G * hd, d)
        >>> w_o = torch.randn(d, H * hd)
        >>> w_qkv, w_o_t, b_qkv = K.pack_attention(w_q, w_k, w_v, w_o, num_kv_groups=G)
        >>> w_qkv.shape, w_o_t.shape, b_qkv
        (torch.Size([2, 8, 8]), torch.Size([2, 4, 8]), None)
        >>> torch.equal(w_qkv[1, :4], w_q[4:]) and torch.equal(w_qkv[1, 4:6], w_k[2:])  # group 1: heads 2, 3, key
        True
    """
    G = num_kv_groups
    d = w_q.shape[1]
    if w_k.shape[0] % G or w_q.shape[0] % w_k.shape[0]:
        raise ValueError(
            f"pack_attention: q rows {w_q.shape[0]} and k rows {w_k.shape[0]} do not split "
            f"into {G} KV groups"
        )
    hd = w_k.shape[0] // G
    r = w_q.shape[0] // (G * hd)
    if w_v.shape != w_k.shape or w_o.shape != (d, w_q.shape[0]):
        raise ValueError(
            f"pack_attention: expected w_v {tuple(w_k.shape)} and w_o {(d, w_q.shape[0])}; got "
            f"{tuple(w_v.shape)} and {tuple(w_o.shape)}"
        )
    w_qkv = torch.cat(
        (w_q.view(G, r * hd, d), w_k.view(G, hd, d), w_v.view(G, hd, d)), dim=1
    ).contiguous()
    w_o_t = w_o.t().reshape(G, r * hd, d).contiguous()
    b_qkv = None
    if b_q is not None or b_k is not None or b_v is not None:
        zeros = lambda n: torch.zeros(n, dtype=w_q.dtype, device=w_q.device)  # noqa: E731
        b_q = zeros(G * r * hd) if b_q is None else b_q
        b_k = zeros(G * hd) if b_k is None else b_k
        b_v = zeros(G * hd) if b_v is None else b_v
        b_qkv = torch.cat((b_q.view(G, r * hd), b_k.view(G, hd), b_v.view(G, hd)), dim=1).contiguous()
    return w_qkv, w_o_t, b_qkv
