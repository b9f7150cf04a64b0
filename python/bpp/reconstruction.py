"""Least-squares reconstruction of width-pruned layers: each layer's output projections (o_proj on
the kept heads' columns, down_proj on the kept channels) refit, with an output bias, so that on
calibration tokens they reproduce what the dense model's projection outputs at that layer.

Per projection, with X ``(N, k)`` its kept inputs in the already-pruned (and already
reconstructed) model, Y ``(N, d)`` the dense model's outputs of that projection at that layer and
W₀ ``(d, k)`` the kept columns of its weight, the refit solves

    min_{W, b} ||X Wᵀ + 1 bᵀ − Y||² + δ ||W − W₀||²,   δ = λ · mean(diag(X_cᵀ X_c))

(X_c: X centred over the tokens). The intercept b is free, so it takes over FLAP's bias
compensation: as λ grows W tends to W₀ and b to mean(Y) − W₀ mean(X), which in a layer whose
kept inputs equal the dense model's is exactly FLAP's bias (the pruned columns times their mean
inputs). The damping pulls W towards the original weights rather than towards zero, so a large λ
means "trust the original weights", never "shrink them".

Inputs come from the pruned model layer by layer: layer ℓ's projections are fit on what the
pruned layers before it (already refit) feed it, so each refit also corrects the error that
reaches it from below. Only the normal equations are kept: XᵀX, XᵀY and the column sums in
float64, accumulated over the calibration batches. Per layer the calibration windows run through
the layer's own modules: once in the dense model (targets), up to o_proj, up to down_proj with
the new o_proj, and once through the whole refit layer (the next layer's inputs). A layer the mask
drops, and a projection with nothing pruned, are left alone; a block with all of its units pruned
keeps only its intercept, the dense output's mean (what FLAP's bias gives it too).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import BppError
from .masks import Masks
from .models.replay import layer_inputs, run_layer
from .space import MaskSpace

# λ: δ = λ · mean(diag X_cᵀX_c). "auto": per projection, the λ of AUTO_DAMPINGS whose refit on half the
# calibration batches has the least error on the other half, then the refit on all of them with it; it
# does better than any one λ in and out of the calibration domain (bench/RESULTS.md, across domains)
DAMPING = "auto"
AUTO_DAMPINGS = (0.01, 0.1, 1.0, 10.0)


def parse_damping(value, name: str = "the reconstruction damping") -> float | str:
    """``"auto"`` or a finite number >= 0 (also as a string), or a one-line error naming ``name``."""
    if value == "auto":
        return "auto"
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number >= 0):
        raise BppError(f"{name} must be 'auto' or a finite number >= 0, got {value!r}")
    return number
MAX_DAMPING_TRIES = 12  # δ grows tenfold per failed Cholesky factorisation


@dataclass
class Reconstruction:
    """Refit output projections of one mask (S = 1), per layer of the original model.

    ``o_proj_weight[l]`` ``(d, kept query heads · head_dim)`` and ``down_proj_weight[l]``
    ``(d, kept channels)``: the new kept columns, or None where the projection is left as it is
    (layer dropped, or nothing pruned); ``o_proj_bias[l]`` / ``down_proj_bias[l]`` ``(d,)``: the
    intercepts (zeros where left alone). In the model's dtype, on the CPU. ``errors[l]``: the
    relative squared error Σ‖ŷ − y‖² / Σ‖y‖² on the calibration tokens of each refit projection:
    ``masked`` (kept weights, no bias), ``bias`` (kept weights, best bias) and ``refit``."""

    o_proj_weight: list[torch.Tensor | None]
    o_proj_bias: list[torch.Tensor]
    down_proj_weight: list[torch.Tensor | None]
    down_proj_bias: list[torch.Tensor]
    damping: float | str
    tokens: int
    errors: list[dict] = field(default_factory=list)

    def mean_errors(self) -> dict:
        """Per projection, the mean over its refit layers of each relative error of ``errors``
        (``masked``, ``bias``, ``refit``), the number of those layers and, with ``damping="auto"``,
        how many layers chose each λ."""
        out = {}
        for name in ("o_proj", "down_proj"):
            rows = [r[name] for r in self.errors if name in r]
            if rows:
                out[name] = {**{k: sum(r[k] for r in rows) / len(rows) for k in ("masked", "bias", "refit")},
                             "layers": len(rows)}
                if "damping" in rows[0]:
                    chosen = [r["damping"] for r in rows]
                    out[name]["damping_chosen"] = {f"{lam:g}": chosen.count(lam) for lam in sorted(set(chosen))}
        return out

    def compact_kwargs(self) -> dict:
        """The keyword arguments of :func:`bpp.compaction.compact_model` and ``save_compacted``."""
        return {"o_proj_weight": self.o_proj_weight, "o_proj_bias": self.o_proj_bias,
                "down_proj_weight": self.down_proj_weight, "down_proj_bias": self.down_proj_bias}


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


# --- running the model layer by layer ---------------------------------------------------------------

class _Stop(Exception):
    """Raised in a projection's pre-hook once its kept inputs are captured: the layer need not go on."""


class _Projection:
    """Hooks on one output projection: in the dense pass they record its output; in the pruned
    passes they zero its pruned inputs, optionally record the kept inputs and stop the layer there,
    and, once refit, replace its output by ``x_kept Wᵀ + b``."""

    def __init__(self, module, keep: torch.Tensor):
        self.module = module
        self.keep_idx = keep.nonzero().flatten().to(module.weight.device)
        self.keep = keep.to(module.weight.device)
        self.pruned = not bool(keep.all())
        self.dense = True
        self.stop = False
        self.fit: tuple[torch.Tensor, torch.Tensor] | None = None
        self.captured = None
        self.handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, module, args):
        if self.dense or not self.pruned:
            return None
        x = args[0] * self.keep.to(args[0].dtype)
        if self.stop:
            self.captured = x[..., self.keep_idx]
            raise _Stop
        return (x,) + tuple(args[1:])

    def _post(self, module, args, out):
        if self.dense:
            self.captured = out
            return None
        if self.fit is not None:
            return F.linear(args[0][..., self.keep_idx], *self.fit)
        return None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _check_calib(model, calib) -> torch.Tensor:
    if not torch.is_tensor(calib) or calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32):
        raise BppError("reconstruction needs calibration windows as an (n, T) integer tensor of token ids")
    if calib.shape[0] < 1 or calib.shape[1] < 1:
        raise BppError(f"reconstruction needs at least one calibration window of at least one token, got shape "
                       f"{tuple(calib.shape)}")
    vocab = model.get_input_embeddings().num_embeddings
    if int(calib.min()) < 0 or int(calib.max()) >= vocab:
        raise BppError(f"calibration token ids must lie in [0, {vocab}); got [{int(calib.min())}, {int(calib.max())}]")
    return calib.long()


@torch.no_grad()
def reconstruct(model, masks: Masks, calib: torch.Tensor, *, damping: float | str = DAMPING, batch_size: int = 8,
                progress: bool = False) -> Reconstruction:
    """Refit the output projections of every width-pruned layer of ``model`` under ``masks``
    (S = 1) on the calibration windows ``calib`` ``(n, T)``, layer by layer with inputs from the
    already-pruned model and targets from the dense one (module docstring). ``damping``: λ ≥ 0,
    or ``"auto"`` (the default): per projection the λ of ``AUTO_DAMPINGS`` whose refit on
    alternate batches of windows does best on the others (:func:`choose_damping`; the batches
    shrink to make at least two), then the refit on all of them with it; ``batch_size``: windows
    per forward. ``model`` is left as it was. Returns the
    :class:`Reconstruction` that :func:`bpp.compaction.compact_model` takes."""
    from tqdm.auto import tqdm

    space = MaskSpace.from_model(model)
    masks.validate(space)
    if masks.S != 1:
        raise BppError(f"reconstruction takes one mask (S = 1), got {masks.S}")
    damping = parse_damping(damping)
    auto = damping == "auto"
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise BppError(f"batch_size must be a positive integer, got {batch_size!r}")
    calib = _check_calib(model, calib)
    if auto:  # at least two batches: one fits, the other judges
        if calib.shape[0] < 2:
            raise BppError("damping 'auto' holds back half of the calibration windows, so it needs at least 2")
        batch_size = min(batch_size, math.ceil(calib.shape[0] / 2))
    eff = masks.effective().to("cpu")
    kept_heads = eff.kept_heads(space.heads_per_group)[0].flatten(1)  # (L, G·r): groups and query-head slots
    d, dtype = space.hidden_size, model.model.layers[0].mlp.down_proj.weight.dtype
    device = model.get_input_embeddings().weight.device
    layers = model.model.layers
    training = model.training
    model.eval()
    try:
        dense = [layer_inputs(model, calib[i:i + batch_size].to(device))[0]
                 for i in range(0, calib.shape[0], batch_size)]
        _, kwargs = layer_inputs(model, calib[:1].to(device))  # batch-1 extras broadcast to any batch
        pruned = [h.clone() for h in dense]
        result = Reconstruction([None] * space.n_layers, [torch.zeros(d, dtype=dtype)] * space.n_layers,
                                [None] * space.n_layers, [torch.zeros(d, dtype=dtype)] * space.n_layers,
                                damping="auto" if auto else float(damping), tokens=int(calib.numel()))
        for i in tqdm(range(space.n_layers), desc="reconstruction", unit="layer", disable=not progress):
            layer = layers[i]
            layer_device = next(layer.parameters()).device
            dense = [h.to(layer_device) for h in dense]
            pruned = [h.to(layer_device) for h in pruned]
            if not bool(eff.layers[0, i]):  # dropped: the pruned model skips it
                dense = [run_layer(layer, h, kwargs) for h in dense]
                continue
            projections = {"o_proj": _Projection(layer.self_attn.o_proj, kept_heads[i].repeat_interleave(space.head_dim)),
                           "down_proj": _Projection(layer.mlp.down_proj, eff.channels[0, i])}
            try:
                targets = {name: [] for name in projections}
                next_dense = []
                for h in dense:
                    next_dense.append(run_layer(layer, h, kwargs))
                    for name, p in projections.items():
                        if p.pruned:
                            targets[name].append(p.captured)
                        p.captured = None
                for p in projections.values():
                    p.dense = False
                record = {"layer": i}
                for name, p in projections.items():  # o_proj first: down_proj's inputs depend on it
                    if not p.pruned:
                        continue
                    halves = [NormalEquations(len(p.keep_idx), d, device=layer_device) for _ in range(2)]
                    p.stop = True
                    for j, (h, y) in enumerate(zip(pruned, targets[name])):
                        try:
                            run_layer(layer, h, kwargs)
                        except _Stop:
                            pass
                        halves[j % 2].add(p.captured, y)
                        p.captured = None
                    p.stop = False
                    targets[name] = None
                    w0 = p.module.weight.detach()[:, p.keep_idx]
                    lam, held = choose_damping(*halves, w0) if auto else (float(damping), None)
                    normal = halves[0]
                    normal += halves[1]
                    w, b, record[name] = normal.solve(w0, lam)
                    if auto:
                        record[name].update(damping=lam, held_back_errors={str(k): v for k, v in held.items()})
                    p.fit = (w.to(dtype), b.to(dtype))
                    weights = result.o_proj_weight if name == "o_proj" else result.down_proj_weight
                    biases = result.o_proj_bias if name == "o_proj" else result.down_proj_bias
                    weights[i], biases[i] = p.fit[0].cpu(), p.fit[1].cpu()
                pruned = [run_layer(layer, h, kwargs) for h in pruned]
                dense = next_dense
                result.errors.append(record)
            finally:
                for p in projections.values():
                    p.remove()
    finally:
        model.train(training)
    return result
