"""The evolutionary baseline (``--policy evopress``): an EvoPress-style (1 + λ) search over the
allocation policy's space, from its start, under its parameter budget and with its loss, so a
forward-only search without a gradient can be compared with it at equal mask evaluations.

A genome is a mask's per-layer kept channel counts c (L,) and KV-group counts g (L,) over the
fixed within-layer ranking of :func:`.counts.start_ranking`; every genome keeps exactly the
channels the budget leaves once its groups are kept (:func:`.counts.channels_left`). The first
parent is the allocation policy's starting mask (the init's counts, shifted onto the budget).

An offspring is the parent after 1 to ``MAX_MUTATIONS`` mutations (the number drawn as the
smaller of two uniform draws, so one is the most likely), each budget-exact:

- a channel move (probability 1 − ``GROUP_MOVE_P``): one level, m / ``LEVELS`` channels, from one
  layer to another (fewer where the donor runs out or the receiver fills up);
- a KV-group move (with ``attention_units="heads"``: a query-head slot move, within [0, r]): one
  layer keeps one group more or fewer (within [0, G] and the budget), and
  the channels that frees or costs are given to or taken from random layers, a level at a time.

Each generation runs in two stages over consecutive loop steps, each step on its own batch:

1. explore (one step): the parent and λ = samples − 1 offspring on one batch;
2. confirm (``CONFIRM_STEPS`` steps): the parent and the ``SURVIVORS`` offspring with the lowest
   stage-1 losses on each step's batch; after the last, the survivor with the lowest mean loss
   over those windows replaces the parent only when it is lower than the parent's mean on the
   same windows.

A generation costs samples + ``CONFIRM_STEPS`` · (1 + ``SURVIVORS``) evaluations over
1 + ``CONFIRM_STEPS`` steps. A run may end mid-generation: the output is then the parent.
"""
from __future__ import annotations

import math

import torch

from ..budget import Budget
from ..errors import BppError
from ..masks import Masks
from ..space import MaskSpace
from .config import PruneConfig
from .counts import channels_left, shifted_counts, start_ranking, top_masks
from .interface import Proposal, SearchStart, fmt

SURVIVORS = 2  # offspring re-scored against the parent in stage 2
CONFIRM_STEPS = 4  # stage 2's batches: 4× the tokens stage 1 judged the offspring on
GROUP_MOVE_P = 0.1  # the chance that a mutation moves a KV group rather than channels
MAX_MUTATIONS = 3  # an offspring is the parent after 1 to this many mutations
LEVELS = 32  # a channel move shifts m / LEVELS channels (at least one)
DISTINCT_TRIES = 8  # redraws of an offspring whose mutations cancelled out


class EvolutionPolicy:
    """A (1 + λ) evolutionary search over per-layer channel and KV-group counts.

    ``channel_ranks (L, m)`` / ``group_ranks (L, G)``: each unit's position in its layer (0 = kept
    first); ``init_channels`` / ``init_groups`` ``(L,)``: the init mask's kept counts (the
    channels are shifted onto the budget's channel total as the allocation policy does).
    ``sparsity``: the fraction of the group + channel parameters removed. ``samples``: masks of
    the explore step (the parent and samples − 1 offspring)."""

    name = "evopress"
    files = ("evolution.json",)  # what outputs() writes

    def __init__(self, space: MaskSpace, channel_ranks: torch.Tensor, group_ranks: torch.Tensor,
                 init_channels: torch.Tensor, init_groups: torch.Tensor, sparsity: float, *, samples: int = 8,
                 budget: Budget | None = None, attention_units: str = "groups"):
        L, m = space.n_layers, space.n_channels
        self.attention_units = attention_units  # "heads": query-head slots take the KV groups' place
        G = self.n_attention = space.n_groups if attention_units == "groups" else space.heads_per_group
        if tuple(channel_ranks.shape) != (L, m) or tuple(group_ranks.shape) != (L, G):
            raise BppError(f"ranks must be (L, m) = {(L, m)} and (L, {attention_units}) = {(L, G)}")
        if samples < 2:
            raise BppError(f"--samples must be at least 2 (the parent and one offspring), got {samples}")
        self.space, self.sparsity, self.samples = space, float(sparsity), int(samples)
        self.budget = budget if budget is not None else Budget(space, "channel,group", sparsity, "params")
        self.target = (1.0 - self.sparsity) * space.prunable_params
        self.channel_ranks, self.group_ranks = channel_ranks.long(), group_ranks.long()
        self.level = min(m, max(1, round(m / LEVELS)))
        self.init_groups = init_groups.long().clone()
        total = channels_left(space, self.target, self.init_groups.unsqueeze(0), attention_units)
        if int(total[0]) < 0:
            what = "KV groups" if attention_units == "groups" else "query-head slots"
            raise BppError(f"the init mask keeps {int(self.init_groups.sum())} {what}, more parameters than the "
                           f"budget at sparsity {sparsity:g} allows")
        levels = init_channels.to(torch.float64).unsqueeze(0) / m
        self.init_channels = shifted_counts(levels, total, m)[0]
        self.channels, self.groups = self.init_channels.clone(), self.init_groups.clone()  # the parent
        self.stage = "explore"
        self.generation = 0  # generations completed
        self.accepted_at: list[int] = []  # the generations whose survivor replaced the parent
        self.survivors: tuple[torch.Tensor, torch.Tensor] | None = None  # (k, L) channels, groups in stage 2
        self.confirm_losses: torch.Tensor | None = None  # (1 + k, windows so far): parent first
        self.confirm_steps = 0  # stage-2 steps of this generation so far

    @classmethod
    def start(cls, space: MaskSpace, budget: Budget, config: PruneConfig, start: SearchStart) -> "EvolutionPolicy":
        """The policy at the allocation policy's starting mask, ranking units by ``config.rank``."""
        return cls(space, *start_ranking(config, start), config.sparsity, samples=config.samples, budget=budget,
                   attention_units=config.attention_units)

    @classmethod
    def from_state(cls, space: MaskSpace, budget: Budget, config: PruneConfig, state: dict) -> "EvolutionPolicy":
        policy = cls(space, state["channel_ranks"], state["group_ranks"], state["init_channels"],
                     state["init_groups"], config.sparsity, samples=config.samples, budget=budget,
                     attention_units=config.attention_units)
        policy.load_state(state)
        return policy

    # --- genomes ----------------------------------------------------------------------------------
    def masks(self, channels: torch.Tensor, groups: torch.Tensor) -> Masks:
        """S masks keeping, in each layer, its top ``channels (S, L)`` channels and ``groups (S, L)`` groups."""
        return top_masks(self.channel_ranks, self.group_ranks, channels, groups,
                         None if self.attention_units == "groups" else self.space.n_groups)

    def deterministic_mask(self) -> Masks:
        return self.masks(self.channels.unsqueeze(0), self.groups.unsqueeze(0))

    def channel_total(self, groups: torch.Tensor) -> int:
        """Channels the budget leaves once ``groups (L,)`` are kept (−1: groups alone exceed it)."""
        return int(channels_left(self.space, self.target, groups.unsqueeze(0), self.attention_units)[0])

    def channel_move(self, channels: torch.Tensor, generator: torch.Generator) -> bool:
        """Move one level of channels from a random layer to another, in place; False when no layer
        can give to another."""
        L, m = self.space.n_layers, self.space.n_channels
        pairs = ((channels > 0).unsqueeze(1) & (channels < m).unsqueeze(0) & ~torch.eye(L, dtype=torch.bool)).nonzero()
        if len(pairs) == 0:
            return False
        donor, receiver = pairs[int(torch.randint(len(pairs), (), generator=generator))].tolist()
        amount = min(self.level, int(channels[donor]), m - int(channels[receiver]))
        channels[donor] -= amount
        channels[receiver] += amount
        return True

    def group_moves(self, groups: torch.Tensor) -> list[tuple[int, int]]:
        """(layer, ±1): single-layer group changes within [0, G] groups and the budget."""
        moves = []
        for layer in range(self.space.n_layers):
            for delta in (-1, 1):
                moved = groups.clone()
                moved[layer] += delta
                if 0 <= int(moved[layer]) <= self.n_attention and self.channel_total(moved) >= 0:
                    moves.append((layer, delta))
        return moves

    def group_move(self, channels: torch.Tensor, groups: torch.Tensor, generator: torch.Generator) -> bool:
        """Keep one KV group more or fewer in a random layer, in place, and give the channels it frees
        to (or take those it costs from) random layers a level at a time; False when no move is feasible."""
        moves = self.group_moves(groups)
        if not moves:
            return False
        layer, delta = moves[int(torch.randint(len(moves), (), generator=generator))]
        groups[layer] += delta
        m = self.space.n_channels
        missing = self.channel_total(groups) - int(channels.sum())
        while missing != 0:
            sign = 1 if missing > 0 else -1  # +1: channels to give out; −1: channels to take back
            open_layers = (channels < m if sign > 0 else channels > 0).nonzero().flatten()
            j = int(open_layers[int(torch.randint(len(open_layers), (), generator=generator))])
            room = int(m - channels[j]) if sign > 0 else int(channels[j])
            amount = min(self.level, abs(missing), room)
            channels[j] += sign * amount
            missing -= sign * amount
        return True

    def mutate(self, channels: torch.Tensor, groups: torch.Tensor, generator: torch.Generator,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """An offspring of (channels (L,), groups (L,)): 1 to MAX_MUTATIONS budget-exact mutations,
        redrawn when they cancel out."""
        for _ in range(DISTINCT_TRIES):
            c, g = channels.clone(), groups.clone()
            draws = torch.randint(1, MAX_MUTATIONS + 1, (2,), generator=generator)
            for _ in range(int(draws.min())):
                group_first = float(torch.rand((), generator=generator, dtype=torch.float64)) < GROUP_MOVE_P
                if group_first and self.group_move(c, g, generator):
                    continue
                if not self.channel_move(c, generator) and not group_first:
                    self.group_move(c, g, generator)  # no layer can give channels to another: a group move
            if not (torch.equal(c, channels) and torch.equal(g, groups)):
                break
        return c, g

    def offspring(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, L) channels and groups of n offspring of the parent."""
        children = [self.mutate(self.channels, self.groups, generator) for _ in range(n)]
        return torch.stack([c for c, _ in children]), torch.stack([g for _, g in children])

    # --- ask / tell -------------------------------------------------------------------------------
    def ask(self, step: int, generator: torch.Generator) -> Proposal:
        if self.stage == "explore":
            channels, groups = self.offspring(self.samples - 1, generator)
        else:
            channels, groups = self.survivors
        channels = torch.cat([self.channels.unsqueeze(0), channels])
        groups = torch.cat([self.groups.unsqueeze(0), groups])
        return Proposal(self.masks(channels, groups), self.stage, per_window=True, draws=(channels, groups))

    def tell(self, proposal: Proposal, losses: torch.Tensor, lr: float) -> dict:
        """Stage 1: keep the best offspring; stage 2: accumulate their windows and, after the last
        confirm step, replace the parent by the best survivor when it is better on those windows."""
        means = losses.mean(1)
        parent_loss = float(means[0])
        record = {"kind": proposal.kind, "stage": 1 if proposal.kind == "explore" else 2,
                  "generation": self.generation, "evaluated": int(means.numel()),
                  "losses": [x if math.isfinite(x) else None for x in means.tolist()],
                  "mean_loss": parent_loss if math.isfinite(parent_loss) else None, "parent_changed": False}
        if proposal.kind == "explore":
            return {**record, **self._select(proposal.draws, means)}
        return {**record, **self._confirm(losses)}

    def _select(self, draws: tuple[torch.Tensor, torch.Tensor], means: torch.Tensor) -> dict:
        finite = torch.isfinite(means[1:]).nonzero().flatten()
        if len(finite) == 0:  # every offspring failed: the next generation starts afresh
            self.generation += 1
            return {"skipped": True}
        order = finite[torch.sort(means[1:][finite], stable=True).indices][:SURVIVORS]
        channels, groups = draws
        self.survivors = (channels[1:][order].clone(), groups[1:][order].clone())
        self.confirm_losses = torch.zeros(1 + len(order), 0, dtype=torch.float64)
        self.stage, self.confirm_steps = "confirm", 0
        return {"skipped": False, "survivors": order.tolist()}

    def _confirm(self, losses: torch.Tensor) -> dict:
        self.confirm_losses = torch.cat([self.confirm_losses, losses.to(torch.float64)], dim=1)
        self.confirm_steps += 1
        if self.confirm_steps < CONFIRM_STEPS:
            return {"skipped": not math.isfinite(float(losses[0].mean()))}
        acc = self.confirm_losses
        windows = torch.isfinite(acc[0])
        result = {"skipped": False, "confirm_windows": int(windows.sum())}
        if bool(windows.any()):
            parent_mean = float(acc[0, windows].mean())
            rows = acc[1:, windows]
            survivor_means = torch.where(torch.isfinite(rows).all(1), rows.mean(1), torch.inf)
            best = int(torch.argmin(survivor_means))
            best_mean = float(survivor_means[best])
            result.update(parent_confirm_loss=parent_mean, best_confirm_loss=best_mean if math.isfinite(best_mean)
                          else None)
            if best_mean < parent_mean:
                self.channels = self.survivors[0][best].clone()
                self.groups = self.survivors[1][best].clone()
                self.accepted_at.append(self.generation)
                result["parent_changed"] = True
        self.generation += 1
        self.stage, self.survivors, self.confirm_losses = "explore", None, None
        return result

    # --- reports ----------------------------------------------------------------------------------
    def postfix(self, record: dict) -> dict:
        return dict(loss=fmt(record["mean_loss"]), gen=self.generation, accepted=len(self.accepted_at),
                    groups=int(self.groups.sum()), masks_s=fmt(record["masks_per_s"], 1))

    def summary(self, evaluations: int) -> dict:
        return {"evolution": {"evaluations": evaluations, "generations": self.generation,
                              "accepted": len(self.accepted_at), "accepted_generations": list(self.accepted_at),
                              "stage": self.stage, "kept_groups": int(self.groups.sum()),
                              "kept_channels_per_layer": self.channels.tolist(),
                              "kept_groups_per_layer": self.groups.tolist()}}

    def outputs(self, evaluations: int) -> dict:
        """``evolution.json``: the parent's counts, the start's, and how the search went."""
        return {"evolution.json": {"kept_channels": self.channels.tolist(), "kept_groups": self.groups.tolist(),
                                   "attention_units": self.attention_units,
                                   "init_channels": self.init_channels.tolist(),
                                   "init_groups": self.init_groups.tolist(), "generations": self.generation,
                                   "accepted": len(self.accepted_at), "accepted_generations": list(self.accepted_at),
                                   "evaluations": evaluations}}

    # --- state ------------------------------------------------------------------------------------
    def state(self) -> dict:
        survivors = self.survivors
        return {"channels": self.channels.clone(), "groups": self.groups.clone(),
                "channel_ranks": self.channel_ranks.clone(), "group_ranks": self.group_ranks.clone(),
                "init_channels": self.init_channels.clone(), "init_groups": self.init_groups.clone(),
                "stage": self.stage, "generation": self.generation, "accepted_at": list(self.accepted_at),
                "survivors": None if survivors is None else (survivors[0].clone(), survivors[1].clone()),
                "confirm_losses": None if self.confirm_losses is None else self.confirm_losses.clone(),
                "confirm_steps": self.confirm_steps}

    def load_state(self, state: dict) -> None:
        self.channels, self.groups = state["channels"].long().clone(), state["groups"].long().clone()
        self.channel_ranks, self.group_ranks = state["channel_ranks"].clone(), state["group_ranks"].clone()
        self.init_channels = state["init_channels"].long().clone()
        self.init_groups = state["init_groups"].long().clone()
        self.stage, self.generation = state["stage"], int(state["generation"])
        self.accepted_at = [int(x) for x in state["accepted_at"]]
        survivors = state["survivors"]
        self.survivors = None if survivors is None else (survivors[0].long().clone(), survivors[1].long().clone())
        losses = state["confirm_losses"]
        self.confirm_losses = None if losses is None else losses.to(torch.float64).clone()
        self.confirm_steps = int(state["confirm_steps"])
