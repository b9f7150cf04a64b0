"""The search: policies that propose masks and learn from their losses, the loop that drives any
of them, the incumbent, the objective and the run's configuration.

- :mod:`.interface`: what a policy offers the loop (ask / tell, deterministic mask, state)
- :mod:`.units`: the per-unit Bernoulli policy (``--policy units``, the paper's method)
- :mod:`.allocation`: per-layer kept counts over a within-layer ranking (``--policy allocation``),
  with its KV-group moves in :mod:`.group_moves`
- :mod:`.evolution`: an EvoPress-style (1 + λ) search over the allocation policy's counts
  (``--policy evopress``), the forward-only baseline without a gradient
- :mod:`.counts`: rankings, budget-exact integer counts and depth profiles of the count policies
- :mod:`.estimators`: every gradient estimate the policies use; :mod:`.optimizers`: their updates
- :mod:`.loop`: batches, evaluation, metrics, checkpoints and the incumbent, for any policy
- :mod:`.incumbent`: the best mask so far, judged on held-in windows
- :mod:`.objective`: a mask's loss (bias compensation, soft targets) and the calibration windows
- :mod:`.config`: :class:`PruneConfig`, the options that determine a run's result

Adding a policy is one module and one line in :data:`POLICIES`.
"""
from __future__ import annotations

from ..budget import Budget
from ..errors import BppError
from ..space import MaskSpace
from .allocation import AllocationPolicy
from .evolution import EvolutionPolicy
from .config import PruneConfig, needs_ranking, needs_stats
from .interface import Proposal, SearchPolicy, SearchStart
from .loop import SearchLoop
from .objective import MaskLosses, calibration_batches, mask_losses, selection_windows
from .units import UnitsPolicy

POLICIES = {"allocation": AllocationPolicy, "units": UnitsPolicy, "evopress": EvolutionPolicy}

__all__ = ["POLICIES", "AllocationPolicy", "EvolutionPolicy", "MaskLosses", "Proposal", "PruneConfig", "SearchLoop", "SearchPolicy",
           "SearchStart", "UnitsPolicy", "calibration_batches", "config_budget", "mask_losses", "needs_ranking",
           "needs_stats", "new_policy", "resumed_policy", "selection_windows"]


def config_budget(space: MaskSpace, config: PruneConfig) -> Budget:
    """The budget of a run: its learned unit types at its sparsity (and a model its attention units fit)."""
    if config.attention_units == "heads" and space.heads_per_group < 2:
        raise BppError(f"--attention-units heads prunes query heads inside KV groups, but this model has "
                       f"{space.heads_per_group} query head per group; use --attention-units groups")
    # the count policies keep their parameter target over groups and channels (the k/v rows of kept
    # slots included, :func:`.counts.attention_cost`); the per-unit policy learns slots as units
    units = config.attention_units if config.policy == "units" else "groups"
    return Budget(space, config.granularity, config.sparsity, config.budget, attention_units=units)


def new_policy(space: MaskSpace, config: PruneConfig, start: SearchStart) -> SearchPolicy:
    """The policy of a fresh run, starting from ``start``."""
    return POLICIES[config.policy].start(space, config_budget(space, config), config, start)


def resumed_policy(space: MaskSpace, config: PruneConfig, state: dict) -> SearchPolicy:
    """The policy of a resumed run, from its checkpoint ``state`` (ValueError when the checkpoint
    holds no state of the run's policy, e.g. one written by another version of bpp)."""
    saved = state.get("policy")
    if not isinstance(saved, dict) or saved.get("name") != config.policy:
        raise ValueError(f"no state of the {config.policy} policy")
    return POLICIES[config.policy].from_state(space, config_budget(space, config), config, saved)
