"""Pruning methods and metrics, one module each, and the registry that names them.

- :mod:`.calibration`: what the calibrated methods share (layer inputs, one layer at a time,
  masking by input scales, input statistics); :mod:`.ranking`: scores → masks and probabilities.
- :mod:`.magnitude`, :mod:`.wanda_sp`, :mod:`.flap`: one-shot metrics; :mod:`.besa` (learned
  blockwise allocation), :mod:`.loraprune` (LoRA-gradient importance): companion methods;
  :mod:`.pangu` (Pangu Light re-initialisation at compaction) and :mod:`.lora_recovery` (LoRA
  fine-tuning of a compacted model) act on the compacted weights.

:data:`METHODS` maps a method's name to what it offers: a θ prior for ``bpp prune --init`` and a
mask for ``bpp baseline --method``. Both take calibration windows ``(n, T)`` when
``calibrated``.

- prior ``(model, space, calib, keep, granularity) -> (θ, masks, metrics)``: ``θ`` maps
  "channel" / "group" to ``(L, n)`` keep-probabilities in [0, 1] (projected onto the budget
  afterwards), ``masks`` maps them to the ``(L, n)`` bool mask the method implies (the same
  per-type keep counts as the final mask where the method allows, else the same parameter
  count), ``metrics`` holds raw per-unit scores for inspection.
- mask ``(model, space, calib, sparsity) -> Masks`` (S = 1), at the parameter count of a
  policy-gradient mask at that sparsity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..budget import Budget
from ..errors import BppError
from ..masks import Masks
from ..space import MaskSpace
from .besa import besa_mask, besa_prior
from .flap import flap_baseline, flap_prior
from .loraprune import loraprune_mask, loraprune_prior
from .magnitude import magnitude_prior
from .wanda_sp import wanda_sp_prior


@dataclass(frozen=True)
class Method:
    prior: Callable | None  # θ prior for `bpp prune --init` (None: no ranking to start from)
    mask: Callable | None  # baseline mask for `bpp baseline --method`
    calibrated: bool  # needs calibration windows


def _prior_mask(name: str) -> Callable:
    """The layer-uniform mask a prior implies, as a baseline mask."""
    def mask(model, space: MaskSpace, calib, sparsity: float) -> Masks:
        return prior_mask(model, space, name, sparsity, calib)
    return mask


METHODS: dict[str, Method] = {
    "uniform": Method(prior=None, mask=None, calibrated=False),
    "wanda-sp": Method(prior=wanda_sp_prior, mask=_prior_mask("wanda-sp"), calibrated=True),
    "magnitude": Method(prior=magnitude_prior, mask=_prior_mask("magnitude"), calibrated=False),
    "flap": Method(prior=flap_prior, mask=flap_baseline, calibrated=True),
    "besa": Method(prior=besa_prior, mask=besa_mask, calibrated=True),
    "loraprune": Method(prior=loraprune_prior, mask=loraprune_mask, calibrated=True),
}
INIT_METHODS = tuple(name for name, m in METHODS.items() if m.prior is not None or name == "uniform")
BASELINE_METHODS = tuple(name for name, m in METHODS.items() if m.mask is not None)
# ``--init auto``: the search starts from whichever of these masks is better as it would be written,
# the first unless another is better beyond noise (:func:`bpp.jobs.written.choose_start`)
AUTO_INIT, AUTO_CANDIDATES = "auto", ("besa", "flap")


def method(name: str, purpose: str = "init") -> Method:
    """The registry entry of ``name``, or a clear error listing the methods that serve ``purpose``
    ("init" or "baseline")."""
    choices = INIT_METHODS if purpose == "init" else BASELINE_METHODS
    if name not in choices:
        listed = choices + (AUTO_INIT,) if purpose == "init" else choices
        raise BppError(f"unknown {purpose} {name!r}; use one of {', '.join(listed)}")
    return METHODS[name]


def init_candidates(name: str) -> tuple[str, ...]:
    """The init methods ``--init name`` starts from or chooses among (checked): ``auto`` →
    :data:`AUTO_CANDIDATES`, else ``name`` alone."""
    if name == AUTO_INIT:
        return AUTO_CANDIDATES
    method(name, "init")
    return (name,)


def initialise(budget: Budget, name: str, model=None, calib: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, Masks | None, dict]:
    """θ to start from (flat over ``budget``'s learned units, projected onto it), the init mask
    (S = 1; None for uniform), and the raw per-unit metrics (for inspection). Layer units always
    start uniform: no metric scores whole layers."""
    entry = method(name, "init")
    space, keep = budget.space, 1.0 - budget.sparsity
    theta = torch.full((budget.n_units,), keep, dtype=torch.float64)
    if entry.prior is None or budget.granularity == ("layer",):
        return budget.project(theta), None, {}
    if entry.calibrated and calib is None:
        raise BppError(f"{name} needs calibration windows")
    probs, layer_masks, metrics = entry.prior(model, space, calib, keep, budget.granularity)
    slots = None
    if budget.heads and "group" in budget.slices:  # query-head slots: the init's channels, FLAP's slots
        from .flap import flap_slot_prior

        if calib is None:
            raise BppError("query-head slots start from FLAP's fluctuation, which needs calibration windows")
        theta_slots, slots, scores = flap_slot_prior(model, space, calib, keep)
        probs, metrics = {**probs, "group": theta_slots}, {**metrics, "head": scores}
    for t in ("channel", "group"):
        if t in budget.slices:
            theta[budget.slices[t]] = probs[t].to(torch.float64).reshape(-1)
    L = space.n_layers
    init_mask = Masks(
        channels=(layer_masks["channel"] if "channel" in budget.granularity
                  else torch.ones(L, space.n_channels, dtype=torch.bool)).unsqueeze(0),
        groups=(layer_masks["group"] if "group" in budget.granularity and not budget.heads
                else torch.ones(L, space.n_groups, dtype=torch.bool)).unsqueeze(0),
        layers=torch.ones(1, L, dtype=torch.bool),
        heads=None if slots is None else slots.unsqueeze(0),
    )
    return budget.project(theta), init_mask, metrics


def rank_scores(name: str | None, model, space: MaskSpace, stats, calib: torch.Tensor | None, sparsity: float,
                init: str, metrics: dict) -> dict | None:
    """Scores that rank units inside each layer (``--rank``): ``{"channel": (L, m), "group": (L, G)}``
    from FLAP's fluctuation (``stats``: the calibration statistics; with ``"head": (L, r)`` for
    query-head slots) or wanda-sp (the init's own metrics when the init is wanda-sp); None for
    ``name`` None."""
    if name is None:
        return None
    if name == "flap":
        from .flap import flap_unit_scores

        return flap_unit_scores(model, stats)
    if init == "wanda-sp":
        return metrics
    from .wanda_sp import wanda_sp_metric

    scores, _ = wanda_sp_metric(model, space, calib, 1.0 - sparsity, ("channel", "group"))
    return scores


def prior_mask(model, space: MaskSpace, name: str, sparsity: float, calib: torch.Tensor | None = None,
               granularity: tuple[str, ...] = ("channel", "group")) -> Masks:
    """The mask a prior implies at ``sparsity`` (layer-uniform for the metrics)."""
    _, mask, _ = initialise(Budget(space, granularity, sparsity), name, model, calib)
    if mask is None:
        raise BppError(f"{name} gives no ranking, hence no mask")
    return mask


def baseline_mask(name: str, model, space: MaskSpace, calib: torch.Tensor | None, sparsity: float) -> Masks:
    """The mask of method ``name`` at ``sparsity`` (S = 1)."""
    entry = method(name, "baseline")
    return entry.mask(model, space, calib if entry.calibrated else None, sparsity)
