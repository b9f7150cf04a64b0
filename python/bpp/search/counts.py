"""Rankings, counts and depth profiles for the policies that search per-layer kept counts (the
allocation and evolution policies): each unit's position in its layer, the channel total a
parameter budget leaves, integer counts that meet a total exactly, the masks of given counts, and
smooth profiles over depth."""
from __future__ import annotations

import math

import torch

from ..errors import BppError
from ..masks import Masks
from ..space import MaskSpace
from .config import PruneConfig
from .interface import SearchStart


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


def start_ranking(config: PruneConfig, start: SearchStart) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """The within-layer ranking of ``config.rank`` (the init's own scores for "init", else
    ``start.rank_scores``) and the init mask's kept counts: (channel ranks (L, m), group ranks
    (L, G), channels (L,), groups (L,)). With ``attention_units`` "heads", query-head slots take
    the groups' place: slot ranks (L, r) by ``start.rank_scores["head"]``, and each layer keeps the
    share of its slots that the init mask keeps of its groups."""
    init_mask = start.init_mask
    if init_mask is None:
        raise BppError(f"--policy {config.policy} starts from an init method's mask; --init {config.init} has none")
    if getattr(config, "attention_units", "groups") == "heads":
        scores = (start.rank_scores or {}).get("head")
        if scores is None:
            raise BppError("--attention-units heads needs per-slot scores to rank query heads by; use --rank flap")
        G, r = init_mask.groups.shape[-1], scores.shape[-1]
        slots = torch.round(init_mask.groups[0].sum(-1).to(torch.float64) * r / G).long()
        return ranks_from_scores(start.rank_scores["channel"]), ranks_from_scores(scores), \
            init_mask.channels[0].sum(-1), slots
    if config.rank == "init":
        if "channel" not in start.metrics or "group" not in start.metrics:
            raise BppError(f"--init {config.init} gives no per-unit scores to rank by; pass --rank flap or wanda-sp")
        channel_ranks = init_ranking(start.metrics["channel"], init_mask.channels[0])
        group_ranks = init_ranking(start.metrics["group"], init_mask.groups[0])
    else:
        channel_ranks = ranks_from_scores(start.rank_scores["channel"])
        group_ranks = ranks_from_scores(start.rank_scores["group"])
    return channel_ranks, group_ranks, init_mask.channels[0].sum(-1), init_mask.groups[0].sum(-1)


def attention_cost(space: MaskSpace, counts: torch.Tensor, units: str = "groups") -> torch.Tensor:
    """(S,) prunable parameters of attention blocks keeping ``counts (S, L)`` units per layer: KV
    groups, or query-head slots (every group kept: a slot costs its head in each group, and the
    groups' k/v rows stay while a layer keeps any slot)."""
    counts = counts.to(torch.float64)
    if units == "groups":
        return space.group_params * counts.sum(-1)
    G = space.n_groups
    return (G * space.kv_params * (counts > 0) + G * space.head_params * counts).sum(-1)


def attention_counts(mask: Masks, units: str, heads_per_group: int) -> torch.Tensor:
    """(L,) the attention units ``mask`` (S = 1) keeps per layer: KV groups, or query-head slots
    (all r where it has no slots; none where it keeps no group)."""
    eff = mask.effective()
    if units == "groups":
        return eff.groups[0].sum(-1).long().clone()
    slots = eff.heads[0].sum(-1) if eff.heads is not None else torch.full(eff.layers[0].shape, heads_per_group)
    return (slots * eff.groups[0].any(-1)).long()


def channels_left(space: MaskSpace, target: float, groups: torch.Tensor, units: str = "groups") -> torch.Tensor:
    """(S,) channels a budget of ``target`` parameters leaves once ``groups (S, L)`` attention units
    (KV groups, or query-head slots for ``units`` "heads") are kept (−1: they alone exceed it; at
    most every channel)."""
    left = target - attention_cost(space, groups, units)
    total = torch.floor(left / space.channel_params + 1e-9).long()
    return torch.where(left < 0, torch.full_like(total, -1), total.clamp(max=space.n_layers * space.n_channels))


def shifted_counts(levels: torch.Tensor, total: torch.Tensor, cap: int) -> torch.Tensor:
    """Per-layer counts (S, L) for keep levels ``(S, L)`` (fractions before the shift): the shared
    shift v_s solves Σ_l cap·clip(level + v_s, 0, 1) = total (S,), then the counts are rounded by
    largest remainder to that total exactly."""
    lo = (-levels.max(-1).values - 1.0).clone()  # everything clipped to 0
    hi = (1.0 - levels.min(-1).values + 1.0).clone()  # everything clipped to 1
    target = total.to(torch.float64)
    for _ in range(64):  # the bracket is < 4 wide: 2⁻⁶⁴ of it is far below a channel
        mid = 0.5 * (lo + hi)
        kept = (cap * (levels + mid.unsqueeze(-1)).clamp(0.0, 1.0)).sum(-1)
        below = kept < target
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    kappa = cap * (levels + hi.unsqueeze(-1)).clamp(0.0, 1.0)
    return largest_remainder(kappa, total, cap)


def top_masks(channel_ranks: torch.Tensor, group_ranks: torch.Tensor, channels: torch.Tensor,
              groups: torch.Tensor, n_groups: int | None = None) -> Masks:
    """S masks keeping, in each layer, its top ``channels (S, L)`` channels and ``groups (S, L)``
    groups by the ranks (L, m) / (L, G). With ``n_groups`` the attention units are query-head
    slots: ``group_ranks`` (L, r) rank slots, ``groups`` counts them, and every KV group is kept."""
    S, L = channels.shape
    top = group_ranks.unsqueeze(0) < groups.unsqueeze(-1)
    layers = torch.ones(S, L, dtype=torch.bool)
    if n_groups is None:
        return Masks(channel_ranks.unsqueeze(0) < channels.unsqueeze(-1), top, layers)
    return Masks(channel_ranks.unsqueeze(0) < channels.unsqueeze(-1), torch.ones(S, L, n_groups, dtype=torch.bool),
                 layers, top)
