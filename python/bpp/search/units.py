"""The per-unit policy (``--policy units``, the official method of arXiv 2406.10576): a Bernoulli
keep-probability θ_u for every learned unit, held as one flat float64 vector (float64 makes the
projection exact to the last bit that matters and resume bit-exact).

One step: draw S masks m ~ Bernoulli(θ), drop masks whose loss is not finite, form the baseline,
take a plain gradient step θ ← θ − lr·ĝ (no momentum, as the official code) and project θ back
onto the budget. The final mask keeps the highest-θ units within the budget.
"""
from __future__ import annotations

import math

import torch

from ..budget import Budget
from ..masks import Masks
from ..space import MaskSpace
from .config import PruneConfig
from .estimators import binary_entropy, loss_baseline, score_function_gradient
from .interface import Proposal, SearchStart, fmt


class UnitsPolicy:
    """θ over the learned unit types of ``budget``; units of the other types stay kept."""

    name = "units"
    files = ("theta.safetensors",)  # what outputs() writes

    def __init__(self, budget: Budget, samples: int = 8, baseline: str = "moving-average", momentum: float = 0.8):
        self.budget, self.space = budget, budget.space
        self.samples, self.baseline, self.momentum = samples, baseline, momentum
        self.theta = budget.project(torch.full((budget.n_units,), 1.0 - budget.sparsity, dtype=torch.float64))
        self.moving_baseline: float | None = None

    @classmethod
    def start(cls, space: MaskSpace, budget: Budget, config: PruneConfig, start: SearchStart) -> "UnitsPolicy":
        policy = cls(budget, config.samples, config.baseline, config.baseline_momentum)
        policy.theta = start.theta.to(torch.float64).clone()
        return policy

    @classmethod
    def from_state(cls, space: MaskSpace, budget: Budget, config: PruneConfig, state: dict) -> "UnitsPolicy":
        policy = cls(budget, config.samples, config.baseline, config.baseline_momentum)
        policy.load_state(state)
        return policy

    # --- ask / tell ----------------------------------------------------------------------
    def sample(self, S: int, generator: torch.Generator | None = None) -> tuple[Masks, torch.Tensor]:
        """S masks m ~ Bernoulli(θ): the Masks container and the flat (S, N) bool matrix."""
        flat = torch.rand((S, self.budget.n_units), generator=generator, dtype=torch.float64) < self.theta
        return self.budget.to_masks(flat), flat

    def ask(self, step: int, generator: torch.Generator) -> Proposal:
        masks, flat = self.sample(self.samples, generator)
        return Proposal(masks, "units", draws=flat)

    def tell(self, proposal: Proposal, losses: torch.Tensor, lr: float) -> dict:
        losses = losses.float()  # the official code's losses are float32
        valid = torch.isfinite(losses)
        n_valid = int(valid.sum())
        record = {"losses": [None if not math.isfinite(x) else x for x in losses.tolist()]}
        if n_valid >= (2 if self.baseline == "leave-one-out" else 1):
            good = losses[valid]
            baseline, self.moving_baseline = loss_baseline(good, self.baseline, self.moving_baseline, self.momentum)
            # the official code divides by K − 1 whatever was dropped; leave-one-out needs the valid count
            divisor = n_valid if self.baseline == "leave-one-out" else self.samples
            self.step(score_function_gradient(self.theta, proposal.draws[valid], good, baseline, divisor), lr)
            record.update(mean_loss=float(good.double().mean()), baseline=float(baseline), skipped=False)
        else:  # no usable loss: no update, no baseline change
            record.update(mean_loss=None, baseline=self.moving_baseline, skipped=True)
        record.update(valid=n_valid, entropy=self.mean_entropy())
        return record

    def step(self, grad: torch.Tensor, lr: float) -> None:
        """θ ← θ − lr·ĝ, then projected onto the budget."""
        self.theta = self.budget.project(self.theta - lr * grad)

    # --- what it would output --------------------------------------------------------------
    def deterministic_mask(self) -> Masks:
        return self.budget.final_mask(self.theta)

    def theta_masks(self) -> Masks:
        """θ in a Masks container without S (float64), unlearned types at 1."""
        m = self.budget.to_masks(self.theta.unsqueeze(0))
        return Masks(m.channels[0], m.groups[0], m.layers[0], None if m.heads is None else m.heads[0])

    def mean_entropy(self) -> float:
        return float(binary_entropy(self.theta).mean())

    def postfix(self, record: dict) -> dict:
        return dict(loss=fmt(record["mean_loss"]), baseline=fmt(record["baseline"]),
                    entropy=f"{record['entropy']:.3f}", masks_s=fmt(record["masks_per_s"], 1))

    def summary(self, evaluations: int) -> dict:
        theta = self.theta
        return {"theta": {"mean_entropy": self.mean_entropy(),
                          "fraction_at_0_or_1": float(((theta == 0) | (theta == 1)).double().mean())}}

    def outputs(self, evaluations: int) -> dict:
        return {"theta.safetensors": self.theta_masks()}

    # --- state -----------------------------------------------------------------------------
    def state(self) -> dict:
        return {"theta": self.theta.clone(), "moving_baseline": self.moving_baseline}

    def load_state(self, state: dict) -> None:
        self.theta = state["theta"].to(torch.float64).clone()
        self.moving_baseline = state["moving_baseline"]
