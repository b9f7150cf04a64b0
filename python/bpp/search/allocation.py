"""The allocation policy (``--policy allocation``, the default): learn how many units each layer
keeps, not which units.

A metric ranks the units inside each layer once (the init method's own scores, or FLAP's /
wanda-sp's); a mask is then fixed by its per-layer kept counts, the top units of each layer.
What is learned:

- one *channel offset* a_l per layer: layer l keeps the fraction clip(q_l + a_l + v, 0, 1) of its
  MLP channels, where q_l is the init mask's fraction and the shared shift v meets the parameter
  budget exactly (bisection; counts rounded by largest remainder to the budget's channel total);
- the *KV-group count* g_l of each layer, an integer; a group costs as many parameters as many
  channels, so groups and channels trade under the one parameter budget: a layer that gives up a
  group frees parameters that the shift hands to channels everywhere.

Steps alternate between kinds:
- channel steps: a Gaussian policy over the offsets. P directions ε, centred so that they move
  parameters between layers, not in or out (optionally smooth profiles over depth); the masks at
  a ± σε (antithetic pairs) or at a + σε (independent draws) on one batch; the gradient of the
  smoothed loss J(a) = E f(a + σε) from :func:`bpp.search.estimators.offset_gradient`; an
  optimiser step on the offsets (or their profile coefficients), re-centred (the shift is free).
- rounds (a search of more than ``ROUND_EVALUATIONS`` · 1.5 mask evaluations, :func:`.config.rounds`):
  each round restarts at the incumbent's counts with zero offsets, a fresh optimiser and learning
  rate, half the previous σ (down to σ/8) and a finer space: twice the profiles, then one offset
  per layer. Coarse steps first, then finer ones around the best mask found.
- group steps (every ``group_every``-th): the deterministic mask and up to samples − 1
  single-layer KV-group moves on one batch, judged window by window (:mod:`.group_moves`). Group
  draws never mix with channel draws: a group's loss swing would drown the channel signal.

With ``attention_units="heads"`` the same counts and moves are of query-head slots (head j of every
KV group of a layer; groups kept), costed by :func:`.counts.attention_cost`.
"""
from __future__ import annotations

import math

import torch

from ..budget import Budget
from ..errors import BppError
from ..masks import Masks
from ..space import MaskSpace
from .config import PruneConfig
from .counts import attention_counts, channels_left, shifted_counts, smooth_basis, start_ranking, top_masks
from .estimators import half_correlation, offset_gradient, t_statistics
from .group_moves import GroupMove, GroupMoves
from .interface import Proposal, SearchStart, fmt
from .optimizers import make_optimizer

SNR_MOMENTUM = 0.9  # the progress bar's moving average of the half-batch gradient correlation


# --- the policy -----------------------------------------------------------------------------------

class AllocationPolicy:
    """Per-layer channel offsets and KV-group counts over a fixed within-layer ranking.

    ``channel_ranks (L, m)`` / ``group_ranks (L, G)``: each unit's position in its layer (0 = kept
    first); ``base_channels`` / ``base_groups`` ``(L,)``: the init mask's kept counts (offsets 0
    and these groups reproduce it when it meets the budget). ``sparsity``: the fraction of the
    group + channel parameters removed. ``sigma``: the perturbation scale, as a fraction of a
    layer's channels. ``basis``: the offsets as this many smooth profiles over depth (0: one per
    layer). ``group_every``: every N-th step explores group moves (0: the groups stay)."""

    name = "allocation"
    files = ("allocation.json",)  # what outputs() writes

    def __init__(self, space: MaskSpace, channel_ranks: torch.Tensor, group_ranks: torch.Tensor,
                 base_channels: torch.Tensor, base_groups: torch.Tensor, sparsity: float, sigma: float = 0.05,
                 basis: int = 0, *, samples: int = 8, sampling: str = "antithetic", optimizer: str = "adam",
                 group_every: int = 0, budget: Budget | None = None, attention_units: str = "groups"):
        L, m = space.n_layers, space.n_channels
        self.attention_units = attention_units
        G = self.n_attention = space.n_groups if attention_units == "groups" else space.heads_per_group
        if tuple(channel_ranks.shape) != (L, m) or tuple(group_ranks.shape) != (L, G):
            raise BppError(f"ranks must be (L, m) = {(L, m)} and (L, {attention_units}) = {(L, G)}")
        if not sigma > 0:
            raise BppError(f"--sigma must be positive, got {sigma}")
        self.space, self.sparsity, self.sigma = space, float(sparsity), float(sigma)
        self.first_sigma, self.first_basis, self.optimizer_name = float(sigma), int(basis), optimizer
        self.round = 0
        self.budget = budget if budget is not None else Budget(space, "channel,group", sparsity, "params")
        self.samples, self.sampling, self.group_every = samples, sampling, group_every
        self.channel_ranks, self.group_ranks = channel_ranks.long(), group_ranks.long()
        self.base = base_channels.to(torch.float64) / m  # q_l
        self.offsets = torch.zeros(L, dtype=torch.float64)  # a_l
        self.groups = base_groups.long().clone()  # g_l
        self.target = (1.0 - self.sparsity) * space.prunable_params
        self.basis = self.make_basis(basis)
        if self.channel_total(self.groups.unsqueeze(0))[0] < 0:
            raise BppError(f"the init mask keeps {int(self.groups.sum())} {self.unit_name}, more parameters than the "
                           f"budget at sparsity {sparsity:g} allows")
        self.optimizer = make_optimizer(optimizer, self.n_coefficients)
        self.moves = GroupMoves()
        self.grad_sum = torch.zeros(self.n_coefficients, dtype=torch.float64)  # per-coefficient signal/noise
        self.grad_sq = torch.zeros(self.n_coefficients, dtype=torch.float64)
        self.grad_steps = 0
        self.snr = None  # moving average of the half-batch correlation

    @classmethod
    def start(cls, space: MaskSpace, budget: Budget, config: PruneConfig, start: SearchStart) -> "AllocationPolicy":
        """The policy at the init method's mask, ranking units by ``config.rank``: the init's own
        scores ("init"), else ``start.rank_scores``."""
        return cls._configured(space, budget, config, *start_ranking(config, start))

    @classmethod
    def from_state(cls, space: MaskSpace, budget: Budget, config: PruneConfig, state: dict) -> "AllocationPolicy":
        base = torch.round(state["base"] * space.n_channels).long()
        policy = cls._configured(space, budget, config, state["channel_ranks"], state["group_ranks"], base,
                                 state["groups"])
        policy.load_state(state)
        return policy

    @classmethod
    def _configured(cls, space, budget, config, channel_ranks, group_ranks, base_channels, base_groups):
        return cls(space, channel_ranks, group_ranks, base_channels, base_groups, config.sparsity, sigma=config.sigma,
                   basis=config.basis, samples=config.samples, sampling=config.sampling,
                   optimizer=config.optimizer, group_every=config.group_every, budget=budget,
                   attention_units=getattr(config, "attention_units", "groups"))

    @property
    def unit_name(self) -> str:
        return "KV groups" if self.attention_units == "groups" else "query-head slots"

    # --- counts ↔ masks -------------------------------------------------------------------
    def channel_total(self, groups: torch.Tensor) -> torch.Tensor:
        """(S,) channels the budget leaves once ``groups (S, L)`` are kept (−1: groups alone exceed it)."""
        return channels_left(self.space, self.target, groups, self.attention_units)

    def channel_counts(self, levels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Per-layer kept channels (S, L) for keep levels ``(S, L)`` (fractions before the shift):
        the shared shift meets the budget's channel total exactly (:func:`.counts.shifted_counts`)."""
        total = self.channel_total(groups)
        if bool((total < 0).any()):
            raise BppError("a sampled KV-group allocation exceeds the parameter budget")
        return shifted_counts(levels, total, self.space.n_channels)

    def masks(self, channels: torch.Tensor, groups: torch.Tensor) -> Masks:
        """S masks keeping, in each layer, its top ``channels (S, L)`` channels and ``groups (S, L)`` groups."""
        return top_masks(self.channel_ranks, self.group_ranks, channels, groups,
                         None if self.attention_units == "groups" else self.space.n_groups)

    def levels(self, offsets: torch.Tensor | None = None) -> torch.Tensor:
        return self.base + (self.offsets if offsets is None else offsets)

    def center_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The deterministic allocation: (channels (L,), groups (L,))."""
        groups = self.groups.unsqueeze(0)
        return self.channel_counts(self.levels().unsqueeze(0), groups)[0], self.groups.clone()

    def deterministic_mask(self) -> Masks:
        channels, groups = self.center_counts()
        return self.masks(channels.unsqueeze(0), groups.unsqueeze(0))

    # --- channel draws --------------------------------------------------------------------------
    def draw_directions(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, L) Gaussian directions, centred over the layers (they move channels between layers);
        with a smooth basis Q (L, K), ε = Q ξ with ξ ~ N(0, I_K): smooth profiles over depth."""
        if self.basis is not None:
            xi = torch.randn((n, self.basis.shape[1]), generator=generator, dtype=torch.float64)
            return xi @ self.basis.T
        eps = torch.randn((n, self.space.n_layers), generator=generator, dtype=torch.float64)
        return eps - eps.mean(-1, keepdim=True)

    def coefficients(self, grad: torch.Tensor) -> torch.Tensor:
        """A gradient over the layers (L,) → over the learned coordinates (K with a basis, else L)."""
        return grad if self.basis is None else self.basis.T @ grad

    def from_coefficients(self, step: torch.Tensor) -> torch.Tensor:
        return step if self.basis is None else self.basis @ step

    @property
    def n_coefficients(self) -> int:
        return self.space.n_layers if self.basis is None else self.basis.shape[1]

    def draw_masks(self, eps: torch.Tensor) -> tuple[Masks, torch.Tensor]:
        """One mask per direction at a + σε_i, and their channel counts."""
        levels = self.levels().unsqueeze(0) + self.sigma * eps
        groups = self.groups.unsqueeze(0).expand(eps.shape[0], -1)
        channels = self.channel_counts(levels, groups)
        return self.masks(channels, groups), channels

    def pair_masks(self, eps: torch.Tensor) -> tuple[Masks, torch.Tensor]:
        """The antithetic masks a + σε_p, a − σε_p, interleaved (2P masks), and their channel counts."""
        signs = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(eps.shape[0])
        return self.draw_masks(signs.unsqueeze(-1) * eps.repeat_interleave(2, 0))

    # --- group moves ----------------------------------------------------------------------------
    def feasible_moves(self) -> list[GroupMove]:
        """Single-layer group (or slot) changes that stay within [0, G] groups (r slots) and the budget."""
        G = self.n_attention
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

    def is_group_step(self, step: int) -> bool:
        every = self.group_every
        return bool(every) and step % every == every - 1 and not self.moves.exhausted

    # --- rounds -----------------------------------------------------------------------------------
    def make_basis(self, K: int) -> torch.Tensor | None:
        """(L, K) smooth profiles over depth, or None (every layer its own coordinate)."""
        L = self.space.n_layers
        return smooth_basis(L, K) if 0 < K < L - 1 else None

    def round_settings(self, r: int) -> tuple[float, int]:
        """Round r's perturbation scale and number of profiles: σ halves each round down to σ/8,
        and the profiles double once, then every layer is free: a finer search around the last
        round's result."""
        sigma = self.first_sigma * max(0.5 ** r, 1 / 8)
        K = self.first_basis if r == 0 else 2 * self.first_basis if r == 1 else 0
        return sigma, K

    def new_round(self, r: int, start: Masks | None) -> None:
        """Round r starts at ``start``'s per-layer counts (the incumbent; None: where this policy
        is), with zero offsets, round r's σ and profiles, a fresh optimiser and fresh group moves."""
        if start is not None:
            m = self.space.n_channels
            self.base = start.channels[0].sum(-1).to(torch.float64) / m
            self.groups = attention_counts(start, self.attention_units, self.space.heads_per_group)
        else:
            channels, self.groups = self.center_counts()
            self.base = channels.to(torch.float64) / self.space.n_channels
        self.offsets = torch.zeros_like(self.offsets)
        self.round = r
        self._set_round(r)
        self.moves = GroupMoves()

    def _set_round(self, r: int) -> None:
        self.sigma, K = self.round_settings(r)
        self.basis = self.make_basis(K)
        self.optimizer = make_optimizer(self.optimizer_name, self.n_coefficients)
        self.grad_sum = torch.zeros(self.n_coefficients, dtype=torch.float64)
        self.grad_sq = torch.zeros(self.n_coefficients, dtype=torch.float64)
        self.grad_steps = 0

    # --- ask / tell -----------------------------------------------------------------------------
    def ask(self, step: int, generator: torch.Generator) -> Proposal:
        if self.is_group_step(step):
            feasible = self.feasible_moves()
            if feasible:
                moves = self.moves.next(self.samples - 1, feasible, generator)
                return Proposal(self.move_masks(moves), "group", per_window=True, draws=moves)
        antithetic = self.sampling == "antithetic"
        eps = self.draw_directions(self.samples // 2 if antithetic else self.samples, generator)
        masks, _ = self.pair_masks(eps) if antithetic else self.draw_masks(eps)
        return Proposal(masks, "channel", draws=eps)

    def tell(self, proposal: Proposal, losses: torch.Tensor, lr: float) -> dict:
        if proposal.kind == "group":
            return self._tell_group(proposal.draws, losses)
        return self._tell_channel(proposal.draws, losses, lr)

    def _tell_channel(self, eps: torch.Tensor, losses: torch.Tensor, lr: float) -> dict:
        record = {"kind": "channel", "evaluated": int(losses.numel()),
                  "losses": [x if math.isfinite(x) else None for x in losses.tolist()]}
        estimate = offset_gradient(eps, losses, self.sigma, self.sampling == "antithetic")
        if estimate is None:
            return {**record, "mean_loss": None, "skipped": True}
        layer_grad, eps, diffs = estimate
        grad = self.coefficients(layer_grad)
        self.grad_sum += grad
        self.grad_sq += grad * grad
        self.grad_steps += 1
        update = self.from_coefficients(self.optimizer.update(grad, lr * self.sigma / self.first_sigma))
        self.offsets = self.offsets - update
        self.offsets = self.offsets - self.offsets.mean()
        corr = half_correlation(eps, diffs)
        if corr is not None:
            self.snr = corr if self.snr is None else SNR_MOMENTUM * self.snr + (1 - SNR_MOMENTUM) * corr
        good = losses[torch.isfinite(losses)]
        return {**record, "mean_loss": float(good.mean()), "skipped": False,
                "pair_difference_sd": float(diffs.std()) if diffs.numel() > 1 else None,
                "grad_half_correlation": corr, "snr": self.snr, "grad_norm": float(grad.norm()),
                "update_max": float(update.abs().max()), "grad": grad.tolist(), "kept_groups": int(self.groups.sum())}

    def _tell_group(self, moves: list[GroupMove], per_window: torch.Tensor) -> dict:
        losses = per_window.mean(1)
        record = {"kind": "group", "evaluated": int(losses.numel()), "moves": [[m.layer, m.delta] for m in moves],
                  "losses": [x if math.isfinite(x) else None for x in losses.tolist()]}
        if not math.isfinite(float(losses[0])):
            return {**record, "mean_loss": None, "skipped": True, "kept_groups": int(self.groups.sum())}
        self.moves.add(moves, per_window[1:] - per_window[0])
        taken = self.moves.decide()
        if taken is not None:
            self.apply(taken)
            self.moves.restart()
        return {**record, "mean_loss": float(losses[0]), "skipped": False,
                "taken": None if taken is None else [taken.layer, taken.delta], "kept_groups": int(self.groups.sum())}

    # --- reports ----------------------------------------------------------------------------------
    def postfix(self, record: dict) -> dict:
        return dict(loss=fmt(record["mean_loss"]), snr=fmt(self.snr, 2), groups=int(self.groups.sum()),
                    masks_s=fmt(record["masks_per_s"], 1))

    def summary(self, evaluations: int) -> dict:
        channels, groups = self.center_counts()
        return {"allocation": {"evaluations": evaluations, "snr": self.snr, "round": self.round, "sigma": self.sigma,
                               "gradient_t_statistics": t_statistics(self.grad_sum, self.grad_sq, self.grad_steps),
                               "attention_units": self.attention_units,
                               "kept_groups": int(groups.sum()), "kept_channels_per_layer": channels.tolist(),
                               "kept_groups_per_layer": groups.tolist(), "offsets": self.offsets.tolist()}}

    def outputs(self, evaluations: int) -> dict:
        """``allocation.json``: the deterministic allocation, the offsets, the init's counts."""
        channels, groups = self.center_counts()
        return {"allocation.json": {"kept_channels": channels.tolist(), "kept_groups": groups.tolist(),
                                    "attention_units": self.attention_units,
                                    "offsets": self.offsets.tolist(),
                                    "init_channels": torch.round(self.base * self.space.n_channels).long().tolist(),
                                    "evaluations": evaluations}}

    # --- state ------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"round": self.round, "offsets": self.offsets.clone(), "groups": self.groups.clone(),
                "channel_ranks": self.channel_ranks.clone(), "group_ranks": self.group_ranks.clone(),
                "base": self.base.clone(), "optimizer": self.optimizer.state(), "snr": self.snr,
                "grad_moments": (self.grad_sum.clone(), self.grad_sq.clone(), self.grad_steps), **self.moves.state()}

    def load_state(self, state: dict) -> None:
        self.round = int(state.get("round", 0))
        if self.round:
            self._set_round(self.round)
        self.offsets = state["offsets"].to(torch.float64).clone()
        self.groups = state["groups"].long().clone()
        self.channel_ranks, self.group_ranks = state["channel_ranks"].clone(), state["group_ranks"].clone()
        self.base = state["base"].clone()
        self.optimizer.load_state(state["optimizer"])
        self.snr = state["snr"]
        s_, q_, n_ = state["grad_moments"]
        self.grad_sum, self.grad_sq, self.grad_steps = s_.clone(), q_.clone(), int(n_)
        self.moves.load_state(state)
