"""Rankings, counts and depth profiles for the policies over per-layer counts: each unit's
position in its layer, the channels a parameter budget leaves, integer counts that meet a total
exactly, masks from counts, and smooth profiles over depth."""
from __future__ import annotations

import math

import torch

from ..errors import BppError
from ..masks import Masks
from ..space import MaskSpace


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


def channel_total(space: MaskSpace, target: float, groups: torch.Tensor) -> torch.Tensor:
    """(S,) channels a budget of ``target`` parameters leaves once ``groups (S, L)`` KV groups are
    kept (−1: the groups alone exceed it)."""
    left = target - space.group_params * groups.sum(-1).to(torch.float64)
    total = torch.floor(left / space.channel_params + 1e-9).long()
    return torch.where(left < 0, torch.full_like(total, -1), total.clamp(max=space.n_layers * space.n_channels))


def shifted_counts(levels: torch.Tensor, total: torch.Tensor, m: int) -> torch.Tensor:
    """Per-layer kept channels (S, L) for keep levels ``(S, L)`` (fractions before the shift): the
    shared shift v_s solves Σ_l m·clip(level + v_s, 0, 1) = ``total (S,)``, then the counts are
    rounded by largest remainder to that total exactly."""
    if bool((total < 0).any()):
        raise BppError("a sampled KV-group allocation exceeds the parameter budget")
    lo = (-levels.max(-1).values - 1.0).clone()  # everything clipped to 0
    hi = (1.0 - levels.min(-1).values + 1.0).clone()  # everything clipped to 1
    target = total.to(torch.float64)
    for _ in range(64):  # the bracket is < 4 wide: 2⁻⁶⁴ of it is far below a channel
        mid = 0.5 * (lo + hi)
        kept = (m * (levels + mid.unsqueeze(-1)).clamp(0.0, 1.0)).sum(-1)
        below = kept < target
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    kappa = m * (levels + hi.unsqueeze(-1)).clamp(0.0, 1.0)
    return largest_remainder(kappa, total, m)


def ranked_masks(channel_ranks: torch.Tensor, group_ranks: torch.Tensor, channels: torch.Tensor,
                 groups: torch.Tensor) -> Masks:
    """S masks keeping, in each layer, its top ``channels (S, L)`` channels and ``groups (S, L)``
    KV groups by the ranks ``(L, m)`` / ``(L, G)`` (0 = kept first)."""
    S, L = channels.shape
    return Masks(channel_ranks.unsqueeze(0) < channels.unsqueeze(-1), group_ranks.unsqueeze(0) < groups.unsqueeze(-1),
                 torch.ones(S, L, dtype=torch.bool))
