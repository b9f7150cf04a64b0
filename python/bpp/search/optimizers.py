"""Update rules for the allocation policy's coefficients: Adam, or steps of the normalised
gradient. State is plain float64 tensors, so checkpoints resume bit for bit."""
from __future__ import annotations

import torch

OPTIMIZERS = ("adam", "sgd")


class Adam:
    """Adam on a float64 vector (bias-corrected moments, no clipping of the update)."""

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


class NormalisedSteps:
    """Plain steps of the per-step normalised gradient: the step size does not follow the loss
    scale. Stateless."""

    def update(self, grad: torch.Tensor, lr: float) -> torch.Tensor:
        return lr * grad / grad.pow(2).mean().sqrt().clamp_min(1e-300)

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass


def make_optimizer(name: str, n: int):
    if name == "adam":
        return Adam(n)
    if name == "sgd":
        return NormalisedSteps()
    raise ValueError(f"unknown optimizer {name!r}")
