"""RoPE tables for :func:`bpp_kernels.masked_attention`: the ``cos`` / ``sin`` it takes, in
Hugging Face's rotate-half convention (Llama, Qwen2/3, Gemma), for positions 0..T-1 or any
positions (a shifted window, a sequence that continues a cache)."""
from __future__ import annotations

import torch


def rope_tables(positions: int | torch.Tensor, head_dim: int, base: float = 10000.0, *,
                scaling: float = 1.0, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``(T, head_dim)``, for ``positions``: an int T (positions 0..T-1) or a
    1-D integer tensor of T positions. Angles ``p / scaling · base^(−2i/head_dim)`` are computed
    in float32 (float64 when ``dtype`` is float64) and the tables cast to ``dtype``; ``scaling`` is
    linear position interpolation (1: none). ``head_dim`` must be even; the tables' two halves are
    equal, as rotate-half expects.

    Example::

        >>> import torch, bpp_kernels as K
        >>> cos, sin = K.rope_tables(12, 8)                  # positions 0..11, head_dim 8
        >>> cos.shape, cos.dtype, torch.equal(cos[:, :4], cos[:, 4:])
        (torch.Size([12, 8]), torch.float32, True)
        >>> c, s = K.rope_tables(torch.tensor([10, 11]), 8)  # a window that starts at position 10
        >>> torch.allclose(c, cos[10:]) and torch.allclose(s, sin[10:])
        True
    """
    if isinstance(positions, int):
        if positions < 1:
            raise ValueError(f"rope_tables: need at least one position, got T={positions}")
        positions = torch.arange(positions, device=device)
    if positions.dim() != 1 or positions.is_floating_point() or positions.is_complex():
        raise ValueError(f"rope_tables: positions must be an int or a 1-D integer tensor, got "
                         f"{tuple(positions.shape)} {positions.dtype}")
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"rope_tables: rotate-half RoPE needs an even head_dim, got {head_dim}")
    if not base > 1.0 or not scaling > 0.0:
        raise ValueError(f"rope_tables: base must be > 1 and scaling > 0, got base={base}, scaling={scaling}")
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    device = positions.device if device is None else device
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=wide, device=device) / head_dim)
    angles = torch.outer(positions.to(device=device, dtype=wide) / scaling, inv)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)
