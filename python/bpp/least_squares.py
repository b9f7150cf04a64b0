"""Damped least squares with an intercept from accumulated normal equations: the solver behind
:mod:`bpp.reconstruction`, and the choice of its damping on held-back tokens."""
from __future__ import annotations

import math

import torch

from .errors import BppError

AUTO_DAMPINGS = (0.01, 0.1, 1.0, 10.0)
MAX_DAMPING_TRIES = 12  # δ grows tenfold per failed Cholesky factorisation


class NormalEquations:
    """XᵀX, XᵀY, ΣX, ΣY and Σ‖y‖² of one projection over the calibration tokens (float64)."""

    def __init__(self, k: int, d: int, device=None):
        f64 = dict(dtype=torch.float64, device=device)
        self.xx, self.xy = torch.zeros(k, k, **f64), torch.zeros(k, d, **f64)
        self.x, self.y = torch.zeros(k, **f64), torch.zeros(d, **f64)
        self.yy = 0.0
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``x`` ``(..., k)`` inputs and ``y`` ``(..., d)`` targets of the same tokens."""
        y = y.reshape(-1, self.xy.shape[1]).to(self.xx.device, torch.float64)
        x = x.reshape(y.shape[0], self.xx.shape[0]).to(self.xx.device, torch.float64)  # k may be 0
        self.xx += x.T @ x
        self.xy += x.T @ y
        self.x += x.sum(0)
        self.y += y.sum(0)
        self.yy += float(y.pow(2).sum())
        self.n += x.shape[0]

    def __iadd__(self, other: "NormalEquations") -> "NormalEquations":
        self.xx += other.xx
        self.xy += other.xy
        self.x += other.x
        self.y += other.y
        self.yy += other.yy
        self.n += other.n
        return self

    def error(self, w: torch.Tensor, b: torch.Tensor | None) -> float:
        """Σ‖x Wᵀ + b − y‖² / Σ‖y‖² from the accumulated sums; ``w`` ``(d, k)`` float64."""
        wt = w.T
        err = float((wt * (self.xx @ wt)).sum()) - 2.0 * float((wt * self.xy).sum()) + self.yy
        if b is not None:
            err += 2.0 * float(b @ (wt.T @ self.x)) + self.n * float(b @ b) - 2.0 * float(b @ self.y)
        return max(err, 0.0) / max(self.yy, 1e-300)

    def solve(self, w0: torch.Tensor, damping: float, errors: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(W, b, errors)``: the damped least-squares refit of the module docstring, float64;
        ``w0`` ``(d, k)``: the kept columns of the original weight. ``errors``: the relative errors
        on these tokens of the masked, bias-compensated and refit outputs (else an empty dict)."""
        if self.n == 0:
            raise BppError("reconstruction needs at least one calibration token")
        w0 = w0.to(self.xx.device, torch.float64)
        k = w0.shape[1]
        x_mean, y_mean = self.x / self.n, self.y / self.n
        record = {"masked": self.error(w0, None), "bias": self.error(w0, y_mean - w0 @ x_mean)} if errors else {}
        if k == 0:  # nothing kept: only the intercept, the dense output's mean
            w = w0
        else:
            sxx = self.xx - self.n * torch.outer(x_mean, x_mean)
            sxy = self.xy - self.n * torch.outer(x_mean, y_mean)
            rhs = sxy - sxx @ w0.T  # X_cᵀ (Y_c − X_c W₀ᵀ): solve for the change of the weights
            w = w0 + _damped_solve(sxx, rhs, damping).T
        b = y_mean - w @ x_mean
        if errors:
            record["refit"] = self.error(w, b)
        return w, b, record


def choose_damping(fit: NormalEquations, check: NormalEquations, w0: torch.Tensor,
                   candidates=AUTO_DAMPINGS) -> tuple[float, dict]:
    """The λ of ``candidates`` whose refit on ``fit``'s tokens has the least relative error on
    ``check``'s (held-back) tokens, and each candidate's error there."""
    held = {lam: check.error(*fit.solve(w0, lam, errors=False)[:2]) for lam in candidates}
    return min(held, key=lambda lam: (held[lam], -lam)), held


def _damped_solve(a: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    """``(a + δI)⁻¹ rhs`` for a symmetric positive semi-definite ``a``, δ = damping · mean(diag a),
    by Cholesky; δ grows tenfold while the factorisation fails (a singular or badly rounded a)."""
    scale = float(a.diagonal().mean())
    if not math.isfinite(scale):
        raise BppError("the calibration activations hold inf or NaN; reconstruction cannot fit them")
    scale = max(scale, 1e-12)
    delta = damping * scale
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    for _ in range(MAX_DAMPING_TRIES):
        chol, info = torch.linalg.cholesky_ex(a + delta * eye)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, chol)
        delta = max(10.0 * delta, 1e-10 * scale)
    raise BppError("the calibration activations are too badly conditioned to refit even with strong "
                   "damping; use more calibration windows or a larger damping")
