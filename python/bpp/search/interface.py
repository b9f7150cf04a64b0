"""What every policy offers the loop: it proposes masks, is told their losses, and says which
mask it would output now (the ask/tell shape of black-box optimisers). The loop owns the data,
the evaluation, the learning-rate schedule, checkpoints, metrics and the incumbent; a policy
owns only its state, its proposals and its update.

A policy class also builds itself: ``start(space, config, start)`` for a fresh run and
``from_state(space, config, state)`` for a resumed one; the registry in :mod:`bpp.search` maps
``--policy`` names to classes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from ..budget import Budget
from ..masks import Masks


def fmt(x: float | None, digits: int = 4) -> str:
    """A number for the progress bar ("-" when there is none)."""
    return "-" if x is None else f"{x:.{digits}f}"


@dataclass
class Proposal:
    """Masks to evaluate on one batch. ``per_window``: the policy wants per-window losses (S, B)
    rather than mean losses (S,). ``draws``: the policy's own record of how it drew them."""

    masks: Masks
    kind: str
    per_window: bool = False
    draws: Any = None


@dataclass
class SearchStart:
    """What a fresh search starts from, computed by the job with :mod:`bpp.methods`: the init
    method's keep-probabilities θ (flat, on the budget), its mask (S = 1; None for ``uniform``),
    its raw per-unit scores, and the within-layer ranking scores (``{"channel": (L, m),
    "group": (L, G)}``, None when the init's own scores rank units)."""

    theta: torch.Tensor | None  # None where the policy needs no θ
    init_mask: Masks | None
    metrics: dict = field(default_factory=dict)
    rank_scores: dict | None = None


class SearchPolicy(Protocol):
    name: ClassVar[str]
    files: ClassVar[tuple[str, ...]]  # the run-folder files of outputs()
    budget: Budget

    def ask(self, step: int, generator: torch.Generator) -> Proposal:
        """The masks to evaluate at ``step``, drawn with ``generator``."""

    def tell(self, proposal: Proposal, losses: torch.Tensor, lr: float) -> dict:
        """Learn from the losses of ``proposal``'s masks (float64, (S,) or (S, B) when
        ``per_window``; non-finite where a mask failed); returns the step's record, with at
        least ``losses``, ``mean_loss`` and ``skipped``."""

    def deterministic_mask(self) -> Masks:
        """The mask the policy would output now (S = 1)."""

    def new_round(self, r: int, start: Masks | None) -> None:
        """Round r ≥ 1 of the search starts at ``start`` (the incumbent, or None); only policies
        that run rounds (:func:`bpp.search.config.rounds`) are asked."""

    def postfix(self, record: dict) -> dict:
        """What the progress bar shows after a step."""

    def state(self) -> dict:
        """Plain tensors and numbers that restore the policy bit for bit."""

    def load_state(self, state: dict) -> None: ...

    def summary(self, evaluations: int) -> dict:
        """What the policy learned, for the report."""

    def outputs(self, evaluations: int) -> dict:
        """Files of the run folder the policy's result goes to: name → Masks or JSON data."""
