"""BESA's arithmetic, apart from any model: the differentiable relaxation of a layer's kept count
(candidate counts, expected and straight-through masks, the starting logits) and the per-block
parameter budgets (rescaled to the total, rounded to whole groups and channels)."""
from __future__ import annotations

import math

import torch

from ..errors import BppError
from ..space import MaskSpace


def candidate_counts(n: int, step: float = 0.01) -> torch.Tensor:
    """Candidate kept-unit counts for a layer of ``n`` units: every count when the grid is finer
    than a unit, else the counts of the keep rates 0, step, 2·step, ..., 1 (int64, increasing)."""
    if n < 1:
        raise BppError("a prunable layer needs at least one unit")
    k = int(round(1.0 / step))
    if n <= k:
        return torch.arange(n + 1)
    return torch.unique(torch.round(torch.linspace(0.0, 1.0, k + 1, dtype=torch.float64) * n).long())


def expected_mask(probs: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
    """E[m_r] = Σ_k p_k·1[r < c_k] for the units in rank order r = 0..n−1 (0 = most important)."""
    ranks = torch.arange(n, device=probs.device)
    return (probs.unsqueeze(-1) * (ranks < counts.to(probs.device).unsqueeze(-1)).to(probs.dtype)).sum(-2)


def hard_mask(count: int, n: int, device=None) -> torch.Tensor:
    """The mask keeping the ``count`` top-ranked units, in rank order (float 0/1)."""
    return (torch.arange(n, device=device) < count).float()


def expected_count(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return (probs * counts.to(probs)).sum(-1)


def straight_through_mask(logits: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
    """In rank order: the hard mask of the rounded expected count in the forward pass, the gradient
    of the expected mask in the backward pass (the official straight-through estimator)."""
    probs = torch.softmax(logits, -1)
    soft = expected_mask(probs, counts, n)
    k = int(torch.round(expected_count(probs, counts)).item())
    return hard_mask(k, n, soft.device).to(soft.dtype) + (soft - soft.detach())  # exactly hard forward


def init_logits(counts: torch.Tensor, n: int, keep: float) -> torch.Tensor:
    """The maximum-entropy distribution over the candidate rates whose expected rate is ``keep``:
    logits β·rate_k, with β found by bisection (β = 0, the official all-zero start, when ``keep``
    is the grid's mean rate). Every candidate starts with some probability, so the gradient reaches
    all of them."""
    rates = counts.to(torch.float64) / n
    lo, hi = -500.0, 500.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float((torch.softmax(mid * rates, 0) * rates).sum()) < keep:
            lo = mid
        else:
            hi = mid
    return (0.5 * (lo + hi) * rates).float()


def feasible_groups(budget: float, space: MaskSpace, learned: tuple[str, ...]) -> tuple[int, int]:
    """The group counts of a block that leave its channels able to fill ``budget`` exactly."""
    G, m, cg, cc = space.n_groups, space.n_channels, space.group_params, space.channel_params
    if "channel" not in learned:
        return 0, G
    lo = max(0, math.ceil((budget - m * cc) / cg - 1e-9))
    hi = min(G, math.floor(budget / cg + 1e-9))
    return lo, max(lo, hi)


def discretise_block(budget: float, group_rate: float | None, carry: float, space: MaskSpace,
                      learned: tuple[str, ...]) -> tuple[int, int, float]:
    """(kept groups, kept channels, new carry) meeting ``budget`` parameters for one block: the
    groups round the learned rate (within what the channels can make up), the finest learned type
    fills the rest, and its rounding remainder (in units) is carried to the next block."""
    G, m, cg, cc = space.n_groups, space.n_channels, space.group_params, space.channel_params
    if learned == ("group",):
        want = budget / cg + carry
        k = min(G, max(0, round(want)))
        return k, m, want - k
    if "group" in learned:
        lo, hi = feasible_groups(budget, space, learned)
        k_g = min(hi, max(lo, round(group_rate * G)))
    else:
        k_g = G
    want = (budget - (k_g * cg if "group" in learned else 0)) / cc + carry
    k_c = min(m, max(0, round(want)))
    return k_g, k_c, want - k_c


def rescale_budgets(learned_keep: torch.Tensor, block_params: float, total: float) -> torch.Tensor:
    """Per-block budgets proportional to the learned keep rates, summing to ``total``, none above a
    whole block (water-filling: capped blocks are fixed and the rest rescaled)."""
    rates = learned_keep.to(torch.float64).clamp_min(1e-6)
    capped = torch.zeros_like(rates, dtype=torch.bool)
    budgets = torch.zeros_like(rates)
    for _ in range(rates.numel() + 1):
        left = total - block_params * capped.sum()
        free = ~capped
        budgets = torch.where(capped, torch.full_like(rates, block_params),
                              rates * left / rates[free].sum())
        over = free & (budgets > block_params)
        if not over.any():
            break
        capped |= over
    return budgets
