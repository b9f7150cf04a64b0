"""The allocation policy (``bpp prune --policy allocation``, issue 18): learn how many units each
layer keeps, not which units.

A metric ranks the units inside each layer once (the init method's own scores, or FLAP's /
wanda-sp's); a mask is then fixed by its per-layer kept counts, the top units of each layer.
What is learned:

- one *channel offset* a_l per layer: layer l keeps the fraction clip(q_l + a_l + v, 0, 1) of its
  MLP channels, where q_l is the init mask's fraction and the shared shift v meets the parameter
  budget exactly (bisection; counts rounded by largest remainder to the budget's channel total);
- the *KV-group count* g_l of each layer, an integer; a group costs as many parameters as
  ~171 SmolLM2 channels, so groups and channels trade under the one parameter budget: a layer
  that gives up a group frees parameters that the shift hands to channels everywhere.

Sampling (a Gaussian policy over the offsets): a channel step draws P directions ε, centred so
that they move parameters between layers, not in or out (the shift absorbs what clipping and
rounding leave), and evaluates the antithetic pair of masks at a ± σε on the same batch. With
f the loss, E[(f(a + σε) − f(a − σε)) ε] / (2σ) is the gradient of the smoothed loss
J(a) = E f(a + σε) (Stein's identity, projected onto the centred directions), so the estimate is
built from paired loss differences: the calibration text's difficulty, shared by both masks of a
pair, cancels. A group step evaluates the current (deterministic) mask and masks that differ from
it by one group in one layer, each with the channels refilled by the shift, on one batch; the
paired differences accumulate per move, and a move is taken when its mean improvement exceeds its
noise. Group draws never mix with channel draws: a group's loss swing would drown the channel
signal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import BppError
from .space import Masks, MaskSpace

TYPES = ("channel", "group")


def ranks_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """(L, n) scores → (L, n) long: each unit's position in its layer's order, 0 = highest score
    (ties: lower index first)."""
    order = torch.sort(-scores.to(torch.float64), dim=-1, stable=True).indices
    return torch.argsort(order, dim=-1)


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


@dataclass
class GroupMove:
    layer: int
    delta: int  # +1: keep one more KV group in the layer; −1: one fewer


class AllocationPolicy:
    """Per-layer channel offsets and KV-group counts over a fixed within-layer ranking.

    ``channel_ranks (L, m)`` / ``group_ranks (L, G)``: each unit's position in its layer (0 = kept
    first); ``base_channels`` / ``base_groups`` ``(L,)``: the init mask's kept counts (offsets 0
    and these groups reproduce it when it meets the budget). ``sparsity``: the fraction of the
    group + channel parameters removed. ``sigma``: the perturbation scale, as a fraction of a
    layer's channels. ``learn_groups``: whether group counts may change."""

    def __init__(self, space: MaskSpace, channel_ranks: torch.Tensor, group_ranks: torch.Tensor,
                 base_channels: torch.Tensor, base_groups: torch.Tensor, sparsity: float, sigma: float = 0.05,
                 learn_groups: bool = True, basis: int = 0):
        L, m, G = space.n_layers, space.n_channels, space.n_groups
        if tuple(channel_ranks.shape) != (L, m) or tuple(group_ranks.shape) != (L, G):
            raise BppError(f"ranks must be (L, m) = {(L, m)} and (L, G) = {(L, G)}")
        if not sigma > 0:
            raise BppError(f"--sigma must be positive, got {sigma}")
        self.space, self.sparsity, self.sigma, self.learn_groups = space, float(sparsity), float(sigma), learn_groups
        self.channel_ranks, self.group_ranks = channel_ranks.long(), group_ranks.long()
        self.base = base_channels.to(torch.float64) / m  # q_l
        self.offsets = torch.zeros(L, dtype=torch.float64)  # a_l
        self.groups = base_groups.long().clone()  # g_l
        self.target = (1.0 - self.sparsity) * space.prunable_params
        self.basis = smooth_basis(L, basis) if 0 < basis < L - 1 else None  # (L, K) or None: every layer free
        if self.channel_total(self.groups.unsqueeze(0))[0] < 0:
            raise BppError(f"the init mask keeps {int(self.groups.sum())} KV groups, more parameters than the "
                           f"budget at sparsity {sparsity:g} allows")

    # --- counts ↔ masks -------------------------------------------------------------------
    def channel_total(self, groups: torch.Tensor) -> torch.Tensor:
        """(S,) channels the budget leaves once ``groups (S, L)`` are kept (−1: groups alone exceed it)."""
        sp = self.space
        left = self.target - sp.group_params * groups.sum(-1).to(torch.float64)
        total = torch.floor(left / sp.channel_params + 1e-9).long()
        return torch.where(left < 0, torch.full_like(total, -1), total.clamp(max=sp.n_layers * sp.n_channels))

    def channel_counts(self, levels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Per-layer kept channels (S, L) for keep levels ``(S, L)`` (fractions before the shift):
        the shared shift v_s solves Σ_l m·clip(level + v_s, 0, 1) = the channel total, then the
        counts are rounded by largest remainder to that total exactly."""
        m = self.space.n_channels
        total = self.channel_total(groups)
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

    def masks(self, channels: torch.Tensor, groups: torch.Tensor) -> Masks:
        """S masks keeping, in each layer, its top ``channels (S, L)`` channels and ``groups (S, L)`` groups."""
        S, L = channels.shape
        return Masks(self.channel_ranks.unsqueeze(0) < channels.unsqueeze(-1),
                     self.group_ranks.unsqueeze(0) < groups.unsqueeze(-1),
                     torch.ones(S, L, dtype=torch.bool))

    def levels(self, offsets: torch.Tensor | None = None) -> torch.Tensor:
        return self.base + (self.offsets if offsets is None else offsets)

    def center_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The deterministic allocation: (channels (L,), groups (L,))."""
        groups = self.groups.unsqueeze(0)
        return self.channel_counts(self.levels().unsqueeze(0), groups)[0], self.groups.clone()

    def center_mask(self) -> Masks:
        channels, groups = self.center_counts()
        return self.masks(channels.unsqueeze(0), groups.unsqueeze(0))

    # --- channel steps ------------------------------------------------------------------------
    def draw_directions(self, pairs: int, generator: torch.Generator) -> torch.Tensor:
        """(P, L) Gaussian directions, centred over the layers (they move channels between layers);
        with a smooth basis Q (L, K), ε = Q ξ with ξ ~ N(0, I_K): smooth profiles over depth."""
        if self.basis is not None:
            xi = torch.randn((pairs, self.basis.shape[1]), generator=generator, dtype=torch.float64)
            return xi @ self.basis.T
        eps = torch.randn((pairs, self.space.n_layers), generator=generator, dtype=torch.float64)
        return eps - eps.mean(-1, keepdim=True)

    def coefficients(self, grad: torch.Tensor) -> torch.Tensor:
        """A gradient over the layers (L,) → over the learned coordinates (K with a basis, else L)."""
        return grad if self.basis is None else self.basis.T @ grad

    def from_coefficients(self, step: torch.Tensor) -> torch.Tensor:
        return step if self.basis is None else self.basis @ step

    @property
    def n_coefficients(self) -> int:
        return self.space.n_layers if self.basis is None else self.basis.shape[1]

    def pair_masks(self, eps: torch.Tensor) -> tuple[Masks, torch.Tensor]:
        """The antithetic masks a + σε_p, a − σε_p, interleaved (2P masks), and their channel counts."""
        signs = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(eps.shape[0])
        return self.draw_masks(signs.unsqueeze(-1) * eps.repeat_interleave(2, 0))

    def draw_masks(self, eps: torch.Tensor) -> tuple[Masks, torch.Tensor]:
        """One mask per direction at a + σε_i (independent draws), and their channel counts."""
        levels = self.levels().unsqueeze(0) + self.sigma * eps
        groups = self.groups.unsqueeze(0).expand(eps.shape[0], -1)
        channels = self.channel_counts(levels, groups)
        return self.masks(channels, groups), channels

    @staticmethod
    def leave_one_out(losses: torch.Tensor) -> torch.Tensor:
        """Each draw's loss minus the mean of the other draws' on the same batch (n ≥ 2)."""
        losses = losses.to(torch.float64)
        return losses - (losses.sum() - losses) / (losses.numel() - 1)

    def channel_gradient(self, eps: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """ĝ = mean_p (L⁺_p − L⁻_p) ε_p / (2σ): the smoothed loss's gradient in the offsets (L,)."""
        diffs = self.pair_differences(losses)
        return (diffs.unsqueeze(-1) * eps).mean(0) / (2.0 * self.sigma)

    @staticmethod
    def pair_differences(losses: torch.Tensor) -> torch.Tensor:
        losses = losses.to(torch.float64)
        return losses[0::2] - losses[1::2]

    # --- group steps --------------------------------------------------------------------------
    def feasible_moves(self) -> list[GroupMove]:
        """Single-layer group changes that stay within [0, G] groups and the budget."""
        G = self.space.n_groups
        moves = []
        for layer in range(self.space.n_layers):
            for delta in (-1, 1):
                g = self.groups.clone()
                g[layer] += delta
                if 0 <= int(g[layer]) <= G and int(self.channel_total(g.unsqueeze(0))[0]) >= 0:
                    moves.append(GroupMove(layer, delta))
        return moves

    def move_masks(self, moves: list[GroupMove]) -> Masks:
        """The deterministic mask first, then one mask per move (channels refilled by the shift)."""
        groups = self.groups.unsqueeze(0).repeat(len(moves) + 1, 1)
        for i, mv in enumerate(moves):
            groups[i + 1, mv.layer] += mv.delta
        levels = self.levels().unsqueeze(0).expand(len(moves) + 1, -1)
        return self.masks(self.channel_counts(levels, groups), groups)

    def apply(self, move: GroupMove) -> None:
        self.groups[move.layer] += move.delta

    # --- state ----------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"offsets": self.offsets.clone(), "groups": self.groups.clone()}

    def load_state(self, state: dict) -> None:
        self.offsets = state["offsets"].to(torch.float64).clone()
        self.groups = state["groups"].long().clone()


def smooth_basis(L: int, K: int) -> torch.Tensor:
    """(L, K) orthonormal columns spanning the K lowest cosine profiles over depth
    cos(π k (l + ½) / L), k = 1..K: each sums to zero over the layers (moves channels between
    layers, not in or out)."""
    x = torch.arange(L, dtype=torch.float64)
    cols = torch.stack([torch.cos(math.pi * k * (x + 0.5) / L) for k in range(1, K + 1)], dim=1)
    return cols / cols.norm(dim=0, keepdim=True)  # already orthogonal: normalising suffices


def half_correlation(eps: torch.Tensor, diffs: torch.Tensor) -> float | None:
    """Correlation across parameters of the gradient estimates from the first and second half of
    a step's pairs (two independent estimates): near 0 when the step carries no signal."""
    P = eps.shape[0]
    if P < 2:
        return None
    h = P // 2
    a = (diffs[:h].unsqueeze(-1) * eps[:h]).mean(0)
    b = (diffs[h:2 * h].unsqueeze(-1) * eps[h:2 * h]).mean(0)
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else None


class Adam:
    """Adam on a float64 vector (bias-corrected moments; state is plain tensors, so checkpoints are
    exact). No clipping of the update: with these betas |m̂/√v̂| stayed ≤ 1.001 over every measured
    allocation run, so a clip never bound (bench/RESULTS.md, estimator hygiene)."""

    def __init__(self, n: int, betas=(0.9, 0.99), eps: float = 1e-12):
        self.b1, self.b2 = betas
        self.eps = eps
        self.m = torch.zeros(n, dtype=torch.float64)
        self.v = torch.zeros(n, dtype=torch.float64)
        self.t = 0

    def update(self, grad: torch.Tensor, lr: float) -> torch.Tensor:
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * grad
        self.v = self.b2 * self.v + (1 - self.b2) * grad * grad
        m_hat = self.m / (1 - self.b1 ** self.t)
        v_hat = self.v / (1 - self.b2 ** self.t)
        return lr * m_hat / (v_hat.sqrt() + self.eps)

    def state(self) -> dict:
        return {"m": self.m.clone(), "v": self.v.clone(), "t": self.t}

    def load_state(self, state: dict) -> None:
        self.m, self.v, self.t = state["m"].clone(), state["v"].clone(), int(state["t"])


def paired_mean_se(diffs: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of per-window paired differences."""
    d = diffs.to(torch.float64)
    n = d.numel()
    mean = float(d.mean())
    se = float(d.std() / math.sqrt(n)) if n > 1 else float("inf")
    return mean, se
