"""Parameter budgets over a model's prunable units: which unit types are learned (granularity),
how many parameters a sparsity leaves, the projection of keep-probabilities onto that budget,
and the deterministic mask that keeps the best units within it.

Units of the learned types are held as one flat vector (types in :data:`UNIT_TYPES` order, each
flattened layer-major); units of the other types stay kept. With ``attention_units="heads"`` the
attention type ("group") stands for query-head slots (``Masks.heads``: head j of every KV group of
a layer, r per layer, each costing its head in every group); KV groups are then all kept, and their
k/v rows are no learned unit's (a layer's fixed cost while it keeps a slot).

Budget kinds:
- ``"count"`` (the official method): one budget per unit type, Σθ_u = k_t, where k_t is the
  number of units of type t kept at the target sparsity. Every unit of a type has the same
  parameter cost, so this is also a parameter budget per type.
- ``"params"``: one joint budget over all learned units, Σ c_u θ_u = (1 − sparsity)·Σ c_u with
  c_u the unit's parameter cost, so attention and MLP compete for the same parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import BppError
from .masks import Masks
from .space import MaskSpace

UNIT_TYPES = ("channel", "group", "layer")  # the order of a flat unit vector
FIELD = {"channel": "channels", "group": "groups", "layer": "layers"}  # Masks attribute per type
BUDGET_KINDS = ("count", "params")


def parse_granularity(granularity: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"group,channel"`` → ``("channel", "group")`` (canonical order), with clear errors."""
    given = [g.strip() for g in granularity.split(",")] if isinstance(granularity, str) else list(granularity)
    given = [n for n in given if n]
    names = [n[:-1] if n.endswith("s") and n[:-1] in UNIT_TYPES else n for n in given]  # plural spellings
    unknown = [g for g, n in zip(given, names) if n not in UNIT_TYPES]
    if unknown or not names:
        raise BppError(f"unknown granularity {','.join(unknown) or repr(granularity)}; "
                       f"use a comma-separated subset of {', '.join(UNIT_TYPES)}")
    chosen = tuple(t for t in UNIT_TYPES if t in names)
    if "layer" in chosen and len(chosen) > 1:
        # a layer's cost depends on how many of its channels/groups are kept, so a linear budget
        # over layers and their own units at once would count parameters twice
        raise BppError("--granularity layer cannot be combined with group/channel yet; use 'layer' "
                       "alone, or 'group,channel'")
    return chosen


def check_sparsity(sparsity: float) -> float:
    if not (isinstance(sparsity, (int, float)) and 0.0 < float(sparsity) < 1.0):
        raise BppError(f"sparsity must be strictly between 0 and 1 (a fraction of the prunable "
                       f"parameters), got {sparsity}")
    return float(sparsity)


def project_onto_budget(theta: torch.Tensor, costs: torch.Tensor, budget: float,
                        iterations: int = 200) -> torch.Tensor:
    """The point x of {0 ≤ x ≤ 1, Σ c_u x_u = budget} closest to θ in the cost-weighted norm
    Σ c_u (x_u − θ_u)², which is x = clamp(θ − v, 0, 1) with the scalar dual v solving
    Σ c_u clamp(θ_u − v, 0, 1) = budget. With equal costs this is the official projection
    (bisection on v per unit type); unlike the official code v may be negative, so the sum is
    met exactly from below as well as from above.

    v is found by bisection (the sum is non-increasing in v); once bisection has isolated the
    units strictly inside (0, 1), v is solved for exactly on that set.
    """
    theta = theta.to(torch.float64)
    costs = costs.to(theta)
    total = float(costs.sum())
    if not 0.0 <= budget <= total:
        raise ValueError(f"budget {budget} outside [0, {total}]")

    def kept(v: float) -> float:
        return float((costs * (theta - v).clamp(0.0, 1.0)).sum())

    lo, hi = float(theta.min()) - 1.0, float(theta.max())  # kept(lo) = total, kept(hi) = 0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if kept(mid) > budget:
            lo = mid
        else:
            hi = mid
    v = 0.5 * (lo + hi)
    shifted = theta - v
    inside = (shifted > 0.0) & (shifted < 1.0)
    if inside.any():  # exact on the identified active set: Σ_in c(θ − v) + Σ_at-one c = budget
        at_one = costs[shifted >= 1.0].sum()
        c_in = costs[inside]
        v_exact = float((c_in * theta[inside]).sum() + at_one - budget) / float(c_in.sum())
        candidate = (theta - v_exact).clamp(0.0, 1.0)
        # keep the exact solve only if it did not move a unit across a bound (then it is exact)
        same_set = torch.equal(((theta - v_exact) > 0) & ((theta - v_exact) < 1), inside)
        if same_set:
            return candidate
    return shifted.clamp(0.0, 1.0)


def deterministic_mask(theta: torch.Tensor, costs: torch.Tensor, budget: float) -> torch.Tensor:
    """Keep the highest-θ units whose total cost stays within ``budget`` (bool, same shape).

    Units are taken in order of decreasing θ (ties: lower index first); a unit that no longer
    fits is skipped and the scan goes on, so cheaper units can fill what is left. With equal
    costs this is exactly the top-k of θ with k = ⌊budget / cost⌋ (the official global threshold)."""
    order = torch.sort(-theta.to(torch.float64), stable=True).indices
    keep = torch.zeros(theta.numel(), dtype=torch.bool)
    sorted_costs = costs.to(torch.float64)[order]
    if bool((sorted_costs == sorted_costs[0]).all()):  # equal costs: a prefix, no Python loop
        k = int(math.floor(budget / float(sorted_costs[0]) + 1e-9))
        keep[order[:k]] = True
        return keep.reshape(theta.shape)
    left = float(budget)
    for idx, c in zip(order.tolist(), sorted_costs.tolist()):
        if c <= left + 1e-9:
            keep[idx] = True
            left -= c
    return keep.reshape(theta.shape)


@dataclass(frozen=True)
class BudgetPart:
    """One equality constraint Σ_{u in part} c_u θ_u = target over a slice of the flat units."""

    name: str  # a unit type, or "params" for the joint budget
    start: int
    stop: int
    target: float


class Budget:
    """The learned unit types of ``space`` at ``sparsity``: their slices of the flat unit vector,
    parameter costs, and the budget parts the units must meet."""

    def __init__(self, space: MaskSpace, granularity="group,channel", sparsity: float = 0.2, kind: str = "count",
                 attention_units: str = "groups"):
        self.space = space
        self.granularity = parse_granularity(granularity)
        self.sparsity = check_sparsity(sparsity)
        if kind not in BUDGET_KINDS:
            raise BppError(f"unknown budget {kind!r}; use one of {', '.join(BUDGET_KINDS)}")
        self.kind = kind
        self.heads = attention_units == "heads"
        L = space.n_layers
        sizes = {"channel": L * space.n_channels, "layer": L,
                 "group": L * (space.heads_per_group if self.heads else space.n_groups)}
        unit_cost = {"channel": space.channel_params, "layer": space.layer_params,
                     "group": space.n_groups * space.head_params if self.heads else space.group_params}
        self.slices: dict[str, slice] = {}
        costs, start = [], 0
        for t in self.granularity:
            self.slices[t] = slice(start, start + sizes[t])
            costs.append(torch.full((sizes[t],), float(unit_cost[t]), dtype=torch.float64))
            start += sizes[t]
        self.costs = torch.cat(costs)
        self.parts = self._parts(sizes)

    def _parts(self, sizes: dict) -> list[BudgetPart]:
        keep = 1.0 - self.sparsity
        if self.kind == "count":
            parts = []
            for t in self.granularity:
                n = sizes[t]
                k = int(round(keep * n))
                if not 0 < k < n:
                    what = "every" if k == 0 else "no"
                    unit = "query-head slot" if self.heads and t == "group" else t
                    raise BppError(
                        f"sparsity {self.sparsity:g} cannot be met by the granularity {t}: "
                        f"{n} {unit}s in all, keeping {k} would prune {what} {unit}; choose a "
                        f"{'smaller' if k == 0 else 'larger'} sparsity or a finer granularity")
                sl = self.slices[t]
                # counts are costed in parameters too, so targets and costs share one unit
                parts.append(BudgetPart(t, sl.start, sl.stop, k * float(self.costs[sl.start])))
            return parts
        total = float(self.costs.sum())
        target = keep * total
        cheapest = float(self.costs.min())
        if total - target < cheapest or target < cheapest:
            raise BppError(f"sparsity {self.sparsity:g} cannot be met by the granularity "
                           f"{','.join(self.granularity)}: the budget of {target:.0f} parameters "
                           f"out of {total:.0f} is finer than the smallest unit ({cheapest:.0f})")
        return [BudgetPart("params", 0, self.costs.numel(), target)]

    @property
    def n_units(self) -> int:
        return self.costs.numel()

    @property
    def learned_params(self) -> float:
        return float(self.costs.sum())

    def targets(self) -> dict[str, float]:
        return {p.name: p.target for p in self.parts}

    # --- flat units ↔ masks -----------------------------------------------------------------
    def to_masks(self, flat: torch.Tensor) -> Masks:
        """Flat (S, N) values (bool or float) → a Masks container; unlearned types all kept."""
        S = flat.shape[0]
        L, sp = self.space.n_layers, self.space
        shapes = {"channel": (S, L, sp.n_channels), "layer": (S, L),
                  "group": (S, L, sp.heads_per_group if self.heads else sp.n_groups)}
        out = {}
        for t in UNIT_TYPES:
            name = self._field(t)
            if t in self.slices:
                out[name] = flat[:, self.slices[t]].reshape(shapes[t])
            else:
                out[name] = torch.ones(shapes[t], dtype=flat.dtype)
        if self.heads:
            out["groups"] = torch.ones((S, L, sp.n_groups), dtype=flat.dtype)
        return Masks(**out)

    def _field(self, unit_type: str) -> str:
        """The Masks field of a unit type (query-head slots hold the attention type with heads)."""
        return "heads" if self.heads and unit_type == "group" else FIELD[unit_type]

    def from_masks(self, masks: Masks) -> torch.Tensor:
        """Masks (with S) → flat (S, N) over the learned unit types."""
        S = masks.layers.shape[0]

        def units(t):
            if self._field(t) == "heads" and masks.heads is None:  # no slots: all kept
                return torch.ones(S, self.slices[t].stop - self.slices[t].start, dtype=masks.layers.dtype)
            return getattr(masks, self._field(t)).reshape(S, -1)

        return torch.cat([units(t) for t in self.granularity], dim=1)

    # --- the budget -------------------------------------------------------------------------
    def project(self, theta: torch.Tensor) -> torch.Tensor:
        """θ (N,) projected onto every budget part."""
        out = theta.clone()
        for part in self.parts:
            sl = slice(part.start, part.stop)
            out[sl] = project_onto_budget(theta[sl], self.costs[sl], part.target)
        return out

    def final_mask(self, theta: torch.Tensor) -> Masks:
        """The deterministic mask keeping the highest-θ units within each budget part (S = 1)."""
        keep = torch.zeros(self.n_units, dtype=torch.bool)
        for part in self.parts:
            sl = slice(part.start, part.stop)
            keep[sl] = deterministic_mask(theta[sl], self.costs[sl], part.target)
        return self.to_masks(keep.unsqueeze(0))

    def sums(self, theta: torch.Tensor) -> list[float]:
        """Σ c_u θ_u of each budget part."""
        return [float((self.costs[p.start:p.stop] * theta[p.start:p.stop]).sum()) for p in self.parts]

    def summary(self, mask: Masks | None) -> dict | None:
        """Parameters of ``mask`` after compaction, and its sparsity of the model and of the
        learned units (None without a mask)."""
        if mask is None:
            return None
        space = self.space
        kept = int(space.params(mask)[0])
        eff = mask.effective()
        heads = {} if mask.heads is None else {"kept_query_heads": int(eff.kept_heads(space.heads_per_group).sum())}
        return {
            "params": kept,
            "sparsity_of_model": 1 - kept / space.total_params,
            "sparsity_of_learned_units": (space.total_params - kept) / self.learned_params,
            "kept_channels": int(eff.channels.sum()), "kept_groups": int(eff.groups.sum()),
            "kept_layers": int(mask.layers.sum()), **heads,
        }
