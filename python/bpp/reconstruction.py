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
reaches it from below. With ``residual`` (the default where a block's output is added to the
residual stream as it is, i.e. every architecture without norms after its blocks) the target also
holds the residual stream's drift at that point: Y is the dense projection's output plus the dense
model's residual stream minus the pruned model's, where the block's output is added (the layer's
input for o_proj, the stream after attention for down_proj), so the refit block steers the stream
back towards the dense model's rather than only reproducing its own output. Only the normal
equations are kept: XᵀX, XᵀY and the column sums in float64, accumulated over the calibration
batches. Per layer the calibration windows run through
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
from .least_squares import AUTO_DAMPINGS, NormalEquations, choose_damping  # noqa: F401 (AUTO_DAMPINGS: API)
from .masks import Masks
from .models.replay import layer_inputs, run_layer
from .space import MaskSpace, block_norms

# λ: δ = λ · mean(diag X_cᵀX_c). "auto": per projection, the λ of AUTO_DAMPINGS whose refit on half the
# calibration batches has the least error on the other half, then the refit on all of them with it; it
# does better than any one λ in and out of the calibration domain (bench/RESULTS.md, across domains)
DAMPING = "auto"


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


@dataclass
class Reconstruction:
    """Refit output projections of one mask (S = 1), per layer of the original model.

    ``o_proj_weight[l]`` ``(d, kept query heads · head_dim)`` and ``down_proj_weight[l]``
    ``(d, kept channels)``: the new kept columns, or None where the projection is left as it is
    (layer dropped, or nothing pruned); ``o_proj_bias[l]`` / ``down_proj_bias[l]`` ``(d,)``: the
    intercepts (zeros where left alone). In the model's dtype, on the CPU. ``errors[l]``: the
    relative squared error Σ‖ŷ − y‖² / Σ‖y‖² on the calibration tokens of each refit projection:
    ``masked`` (kept weights, no bias), ``bias`` (kept weights, best bias) and ``refit``;
    ``residual``: whether the targets held the residual stream's drift (module docstring)."""

    o_proj_weight: list[torch.Tensor | None]
    o_proj_bias: list[torch.Tensor]
    down_proj_weight: list[torch.Tensor | None]
    down_proj_bias: list[torch.Tensor]
    damping: float | str
    tokens: int
    errors: list[dict] = field(default_factory=list)
    residual: bool = False

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


def residual_targets(model) -> bool:
    """Whether ``model``'s blocks add their output projection's output to the residual stream as it
    is (no norm after the block), so a refit can also make up for the stream's drift."""
    return all(len(block_norms(layer)[1]) == 1 for layer in model.model.layers)


@torch.no_grad()
def reconstruct(model, masks: Masks, calib: torch.Tensor, *, damping: float | str = DAMPING, batch_size: int = 8,
                progress: bool = False, residual: bool | None = None) -> Reconstruction:
    """Refit the output projections of every width-pruned layer of ``model`` under ``masks``
    (S = 1) on the calibration windows ``calib`` ``(n, T)``, layer by layer with inputs from the
    already-pruned model and targets from the dense one (module docstring). ``residual``: targets
    that also hold the residual stream's drift (None: wherever :func:`residual_targets` allows;
    True on a model with norms after its blocks is an error). ``damping``: λ ≥ 0,
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
    if residual not in (None, True, False):
        raise BppError(f"residual must be True, False or None (where the model allows), got {residual!r}")
    allowed = residual_targets(model)
    if residual and not allowed:
        raise BppError("residual targets need blocks whose output enters the residual stream as it is; this model "
                       "normalises each block's output (Gemma 3): reconstruct with residual=False")
    residual = allowed if residual is None else bool(residual)
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
                                damping="auto" if auto else float(damping), tokens=int(calib.numel()),
                                residual=residual)
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
            stream = {}  # the residual stream where the MLP block's output is added (the MLP norm's input)
            mlp_norm = getattr(layer, block_norms(layer)[1][0])
            stream_hook = mlp_norm.register_forward_pre_hook(lambda m, a: stream.__setitem__("h", a[0])) \
                if residual else None
            try:
                targets = {name: [] for name in projections}
                next_dense, dense_stream = [], []
                for h in dense:
                    next_dense.append(run_layer(layer, h, kwargs))
                    dense_stream.append(stream.pop("h", None))
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
                        if residual:  # dense stream − pruned stream where this block's output is added
                            y = y + (dense[j] - h if name == "o_proj" else dense_stream[j] - stream.pop("h"))
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
                if stream_hook is not None:
                    stream_hook.remove()
    finally:
        model.train(training)
    return result
