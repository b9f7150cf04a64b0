"""Rankings, counts and depth profiles for the allocation policy: each unit's position in its
layer, integer counts that meet a total exactly, and smooth profiles over depth."""
from __future__ import annotations

import math

import torch


def ranks_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """(L, n) scores → (L, n) long: each unit's position in its layer's order, 0 = highest score
    (ties: lower index first)."""
    order = torch.sort(-scores.to(torch.float64), dim=-1, stable=True).indices
    return torch.argsort(order, dim=-1)


def init_ranking(scores: torch.Tensor, init_mask: torch.Tensor) -> torch.Tensor:
    """Ranks (L, n) with the init mask's kept units first, each part ordered by the score: offsets
    0 then reproduce the init mask whatever produced it."""
    s = scores.to(torch.float64)
    spread = float(s.max() - s.min()) + 1.0
    return ranks_from_scores(s + init_mask.to(torch.float64) * 2 * spread)


def largest_remainder(kappa: torch.Tensor, total: torch.Tensor, cap: int) -> torch.Tensor:
    """Integers k (S, L) with 0 ≤ k ≤ cap and Σ_l k = total (S,), closest to the reals κ (S, L):
    floor, then one more for the largest remainders (or one fewer for the smallest)."""
    k = torch.floor(kappa + 1e-9).clamp(0, cap)
    rem = kappa - k
    deficit = (total.to(k) - k.sum(-1)).unsqueeze(-1)  # (S, 1), |deficit| ≤ L
    position = torch.arange(k.shape[-1]).unsqueeze(0)
    up = torch.sort(torch.where(k < cap, -rem, torch.inf), dim=-1, stable=True).indices
    down = torch.sort(torch.where(k > 0, rem, torch.inf), dim=-1, stable=True).indices
    k = k.scatter_add(-1, up, (position < deficit).to(k))
    k = k.scatter_add(-1, down, -(position < -deficit).to(k))
    return k.long()


def smooth_basis(L: int, K: int) -> torch.Tensor:
    """(L, K) orthonormal columns spanning the K lowest cosine profiles over depth
    cos(π k (l + ½) / L), k = 1..K: each sums to zero over the layers (moves channels between
    layers, not in or out)."""
    x = torch.arange(L, dtype=torch.float64)
    cols = torch.stack([torch.cos(math.pi * k * (x + 0.5) / L) for k in range(1, K + 1)], dim=1)
    return cols / cols.norm(dim=0, keepdim=True)  # already orthogonal: normalising suffices
