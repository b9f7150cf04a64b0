"""Never worse than where it started: the best mask found so far, judged on held-in
calibration windows that the gradient never sees.

The incumbent starts as the init method's own mask. Every so often the policy's current
deterministic mask challenges it: both are evaluated on the same selection windows, and the
challenger replaces the incumbent only when its mean per-window loss is lower by more than
``z`` standard errors of the paired per-window differences. Since a replacement needs a lower
mean loss on those windows, the incumbent's selection loss never increases.
"""
from __future__ import annotations

import math

import torch

from ..masks import Masks


class Incumbent:
    """``mask`` (S = 1), its per-window selection losses ``(n,)`` float64, the step it was set at,
    and the record of every challenge."""

    def __init__(self, mask: Masks, window_losses: torch.Tensor, z: float = 2.0, step: int = 0):
        self.mask = mask
        self.window_losses = window_losses.to(torch.float64).clone()
        self.z = float(z)
        self.changed_at = step
        self.history: list[dict] = []

    @property
    def loss(self) -> float:
        return float(self.window_losses.mean())

    def challenge(self, mask: Masks, window_losses: torch.Tensor, step: int) -> dict:
        """Compare ``mask`` (its per-window losses on the same windows) with the incumbent; replace
        the incumbent when better beyond noise. Returns the record (also kept in ``history``)."""
        d = window_losses.to(torch.float64) - self.window_losses
        n = d.numel()
        mean = float(d.mean())
        se = float(d.std() / math.sqrt(n)) if n > 1 else math.inf
        accepted = mask != self.mask and mean < 0 and mean < -self.z * se
        record = {"step": step, "challenger_loss": float(window_losses.double().mean()), "incumbent_loss": self.loss,
                  "mean_difference": mean, "standard_error": se, "accepted": accepted}
        if accepted:
            self.mask = mask
            self.window_losses = window_losses.to(torch.float64).clone()
            self.changed_at = step
        self.history.append(record)
        return record

    def state(self) -> dict:
        fields = ("channels", "groups", "layers") + (("heads",) if self.mask.heads is not None else ())
        return {"mask": {f: getattr(self.mask, f).clone() for f in fields},
                "window_losses": self.window_losses.clone(), "z": self.z, "changed_at": self.changed_at,
                "history": list(self.history)}

    @classmethod
    def from_state(cls, state: dict) -> "Incumbent":
        inc = cls(Masks(**state["mask"]), state["window_losses"], state["z"], state["changed_at"])
        inc.history = list(state["history"])
        return inc
