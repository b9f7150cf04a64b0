"""The gradient estimates of the policies, in one place: the loop uses them, the tests check
them, and bench/estimators.py measures them.

- Per-unit Bernoulli keep-probabilities (the official method): the score-function estimate with
  a moving-average or leave-one-out baseline.
- Per-layer offsets under Gaussian perturbations (the allocation policy): Stein's identity on
  antithetic pairs (L(a + σε) − L(a − σε)) ε / 2σ, or on independent draws each against the mean
  of the others on the same batch, (L_i − mean_{j≠i} L_j) ε_i / σ.
"""
from __future__ import annotations

import torch

# the official code adds this to θ and 1 − θ under the square root of the gradient normalisation
GRADIENT_EPS = 1e-7


# --- per-unit keep-probabilities -------------------------------------------------------------------

def score_function_gradient(theta: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor,
                            baseline: torch.Tensor | float, n_samples: int) -> torch.Tensor:
    """The official policy-gradient estimate for Bernoulli keep-probabilities:

        ĝ_u = Σ_s (L_s − b_s) · (m_su − θ_u) / sqrt((θ_u + ε)(1 − θ_u + ε)) / (n_samples − 1)

    ``masks`` (S, N) in {0, 1}, ``losses`` (S,), ``baseline`` a scalar or (S,) per-sample
    baselines. (m − θ)/(θ(1 − θ)) is ∇θ log p(m | θ); the official code divides by the square
    root instead (a Fisher-like rescaling: per unit, the score has unit variance), and by
    S − 1 rather than S (it makes the leave-one-out form unbiased; see :func:`loss_baseline`)."""
    theta = theta.to(torch.float64)
    m = masks.to(torch.float64)
    adv = losses.to(torch.float64) - torch.as_tensor(baseline, dtype=torch.float64)
    scaled = (m - theta) / torch.sqrt((theta + GRADIENT_EPS) * (1.0 - theta + GRADIENT_EPS))
    return (adv.reshape(-1, 1) * scaled).sum(0) / (n_samples - 1)


def loss_baseline(losses: torch.Tensor, kind: str, moving_baseline: float | None,
                  momentum: float = 0.8) -> tuple[torch.Tensor, float | None]:
    """Per-sample baselines for the valid (finite) ``losses`` of one step.

    - ``moving-average`` (official): b ← momentum·b + (1 − momentum)·mean(L), starting at the
      first step's mean, and updated *before* it is used, as the official code does.
    - ``leave-one-out``: b = mean(L), so that Σ_s (L_s − mean L)/(S − 1) equals the mean of
      L_s − mean_{j≠s} L_j: each sample is compared with the others on the same batch, which
      cancels the batch-to-batch loss variation that a moving average carries.

    Returns (baseline to subtract, the new moving baseline)."""
    mean = losses.to(torch.float64).mean()
    if kind == "moving-average":
        b = float(mean) if moving_baseline is None else momentum * moving_baseline + (1 - momentum) * float(mean)
        return torch.tensor(b, dtype=torch.float64), b
    if kind == "leave-one-out":
        return mean, moving_baseline
    raise ValueError(f"unknown baseline {kind!r}")


def binary_entropy(theta: torch.Tensor) -> torch.Tensor:
    """Per-unit entropy of Bernoulli(θ) in nats (0 at θ ∈ {0, 1})."""
    t = theta.to(torch.float64)
    return -(torch.special.xlogy(t, t) + torch.special.xlogy(1.0 - t, 1.0 - t))


# --- Gaussian perturbations of per-layer offsets ---------------------------------------------------

def pair_differences(losses: torch.Tensor) -> torch.Tensor:
    """L(a + σε_p) − L(a − σε_p) of interleaved antithetic losses (2P,) → (P,)."""
    losses = losses.to(torch.float64)
    return losses[0::2] - losses[1::2]


def leave_one_out(losses: torch.Tensor) -> torch.Tensor:
    """Each draw's loss minus the mean of the other draws' on the same batch (n ≥ 2)."""
    losses = losses.to(torch.float64)
    return losses - (losses.sum() - losses) / (losses.numel() - 1)


def offset_draws(eps: torch.Tensor, losses: torch.Tensor, antithetic: bool,
                 ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """The usable draws of one step: (their directions (P', L), their loss differences (P',), the
    divisor in units of σ), so that ĝ = mean_p(diff_p · ε_p) / (divisor · σ).

    ``eps`` (P, L): the directions; ``losses``: (2P,) interleaved antithetic losses (a + σε_p,
    a − σε_p), each pair its own baseline, or (P,) independent draws at a + σε_i, each against the
    mean of the other draws on the same batch. Draws whose loss is not finite are left out; None
    when no draw is usable."""
    if antithetic:
        diffs = pair_differences(losses)
        valid = torch.isfinite(diffs)
    else:
        valid = torch.isfinite(losses)
        diffs = torch.zeros_like(losses, dtype=torch.float64)
        if int(valid.sum()) >= 2:
            diffs[valid] = leave_one_out(losses[valid])
        else:
            valid[:] = False
    if int(valid.sum()) == 0:
        return None
    return eps[valid], diffs[valid], 2.0 if antithetic else 1.0


def offset_gradient(eps: torch.Tensor, losses: torch.Tensor, sigma: float, antithetic: bool,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The smoothed loss's gradient in the offsets from one step's draws (see :func:`offset_draws`):
    (ĝ (L,), the directions used, their loss differences), or None when no draw is usable."""
    draws = offset_draws(eps, losses, antithetic)
    if draws is None:
        return None
    eps, diffs, divisor = draws
    return (diffs.unsqueeze(-1) * eps).mean(0) / (divisor * sigma), eps, diffs


def half_correlation(eps: torch.Tensor, diffs: torch.Tensor) -> float | None:
    """Correlation across parameters of the gradient estimates from the first and second half of
    a step's draws (two independent estimates): near 0 when the step carries no signal."""
    P = eps.shape[0]
    if P < 2:
        return None
    h = P // 2
    a = (diffs[:h].unsqueeze(-1) * eps[:h]).mean(0)
    b = (diffs[h:2 * h].unsqueeze(-1) * eps[h:2 * h]).mean(0)
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else None


def t_statistics(grad_sum: torch.Tensor, grad_sq: torch.Tensor, n: int) -> list[float] | None:
    """Per coordinate, from the sums of n gradient estimates and of their squares: the mean / its
    standard error (|t| ≫ 2: a direction the data agree on; |t| ≲ 1: noise). None below 2."""
    if n < 2:
        return None
    mean = grad_sum / n
    var = (grad_sq / n - mean * mean).clamp_min(0) * n / (n - 1)
    return (mean / (var / n).sqrt().clamp_min(1e-300)).tolist()
