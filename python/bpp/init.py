"""Metric-based initialisations of the policy, and the metric masks they imply (also the
baselines of the quality table).

- ``uniform``: θ = keep rate for every unit (no ranking, hence no init mask).
- ``magnitude``: a unit's importance is the L2 norm of all the weights it owns (gate and up rows
  and the down column of a channel; q/k/v rows and o_proj columns of a KV group). No data.
- ``wanda-sp`` (the official default): activation × weight at the inputs of o_proj and down_proj,
  |W_ij|·sqrt(Σ_tokens x_j² / n_windows), averaged over the output rows i, so every input
  feature j gets a score; a channel is one down_proj input; a head sums its head_dim features and
  a KV group averages its query heads. As in the official code (and Wanda), layers are processed
  in order and each layer's calibration input is the output of the layers before it *with their
  init masks applied*, so the metric sees the model it will actually prune.

Scores become keep-probabilities with the official "sigmap" mapping, per layer and unit type:
z-score the metric, apply the sigmoid, shift so the mean equals the keep rate, clamp to [0, 1].
Units ranked first by the metric start most likely to be kept, and the policy starts near the
metric's own mask. The init mask keeps, in every layer, the top units by the metric, at (as close
as integers allow) the same per-type keep count as the final mask, so "init mask" and "final mask"
perplexities compare masks of the same parameter count.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import BppError
from .policy import Policy
from .space import Masks, MaskSpace

# Companion methods (issue 10) live in their own modules; each entry is "module:function" with
# the signature ``fn(model, space, calib, keep, granularity) -> (theta, layer_masks, metrics)``:
# ``theta`` maps "channel" / "group" to (L, n) keep-probabilities in [0, 1] (projected onto the
# budget afterwards), ``layer_masks`` maps them to the (L, n) bool init mask the method implies
# (the same per-type keep counts as the final mask where the method allows, else the same
# parameter count), ``metrics`` holds raw per-unit scores for inspection.
COMPANION_INITS = {"loraprune": "bpp.loraprune:loraprune_init", "besa": "bpp.besa:besa_init"}
INIT_METHODS = ("wanda-sp", "magnitude", "uniform", *COMPANION_INITS)
CALIBRATED_INITS = ("wanda-sp", *COMPANION_INITS)  # inits that need calibration windows


def _companion(spec: str):
    import importlib

    module, name = spec.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:  # a companion module that is not there yet
        raise BppError(f"{spec} is not available: {e}") from e


def sigmap(metric: torch.Tensor, keep: float) -> torch.Tensor:
    """The official mapping of scores to probabilities, row by row (one row = one layer)."""
    metric = metric.to(torch.float64)
    z = (metric - metric.mean(-1, keepdim=True)) / (metric.std(-1, keepdim=True) + 1e-8)
    p = torch.sigmoid(z)
    return (p + (keep - p.mean(-1, keepdim=True))).clamp(0.0, 1.0)


def per_layer_counts(total: int, n_layers: int) -> list[int]:
    """``total`` kept units split over layers as evenly as integers allow; the layers that get one
    more are spread over the depth (not bunched at one end)."""
    base, extra = divmod(total, n_layers)
    counts = [base] * n_layers
    for j in range(extra):
        counts[int((j + 0.5) * n_layers / extra)] += 1
    return counts


def top_per_layer(metric: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Bool (L, n): the ``counts[l]`` highest-metric units of each layer (ties: lower index)."""
    keep = torch.zeros(metric.shape, dtype=torch.bool)
    for layer, k in enumerate(counts):
        order = torch.sort(-metric[layer].to(torch.float64), stable=True).indices
        keep[layer, order[:k]] = True
    return keep


# --- metrics ----------------------------------------------------------------------------------

@torch.no_grad()
def magnitude_metric(model, space: MaskSpace) -> dict[str, torch.Tensor]:
    channels, groups = [], []
    r, hd = space.heads_per_group, space.head_dim
    for layer in model.model.layers:
        mlp, attn = layer.mlp, layer.self_attn
        sq = (mlp.gate_proj.weight.float() ** 2).sum(1) + (mlp.up_proj.weight.float() ** 2).sum(1) \
            + (mlp.down_proj.weight.float() ** 2).sum(0)
        channels.append(sq.sqrt())
        G = space.n_groups
        q = (attn.q_proj.weight.float() ** 2).sum(1).reshape(G, r * hd).sum(1)
        k = (attn.k_proj.weight.float() ** 2).sum(1).reshape(G, hd).sum(1)
        v = (attn.v_proj.weight.float() ** 2).sum(1).reshape(G, hd).sum(1)
        o = (attn.o_proj.weight.float() ** 2).sum(0).reshape(G, r * hd).sum(1)
        groups.append((q + k + v + o).sqrt())
    return {"channel": torch.stack(channels).double(), "group": torch.stack(groups).double()}


class _StopForward(Exception):
    pass


def _layer_inputs(model, input_ids: torch.Tensor):
    """The hidden states entering layer 0, and the other arguments the model passes to every
    decoder layer (position embeddings, attention mask, ...), captured by a pre-hook."""
    captured = {}

    def grab(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _StopForward

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    args, kwargs = captured["args"], dict(captured["kwargs"])
    hidden = args[0] if args else kwargs.pop("hidden_states")
    return hidden, kwargs


def _run_layer(layer, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def _scaled_inputs(module, scale: torch.Tensor):
    """Multiply ``module``'s input features by ``scale`` (zero = pruned) within the block."""
    handle = module.register_forward_pre_hook(
        lambda mod, args: (args[0] * scale.to(args[0].dtype),) + tuple(args[1:]))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def wanda_sp_metric(model, space: MaskSpace, calib: torch.Tensor, keep: float, granularity: tuple[str, ...],
                    chunk: int = 8) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-unit wanda-sp scores ``{"channel": (L, m), "group": (L, G)}`` and the per-layer init
    masks used to feed the next layers (types not in ``granularity`` stay fully kept)."""
    L, G, r, hd = space.n_layers, space.n_groups, space.heads_per_group, space.head_dim
    device = next(model.parameters()).device
    hidden, kwargs = [], None
    for start in range(0, calib.shape[0], chunk):
        h, kw = _layer_inputs(model, calib[start:start + chunk].to(device))
        hidden.append(h)
        kwargs = kw  # the same for every chunk of equal shape
    counts = {"channel": per_layer_counts(round(keep * L * space.n_channels), L),
              "group": per_layer_counts(round(keep * L * G), L)}
    metrics = {"channel": [], "group": []}
    masks = {"channel": [], "group": []}
    for i, layer in enumerate(model.model.layers):
        sums = {"o": torch.zeros(G * r * hd, dtype=torch.float64, device=device),
                "down": torch.zeros(space.n_channels, dtype=torch.float64, device=device)}

        def accumulate(key):
            def hook(module, args):
                x = args[0].detach().to(torch.float64)
                sums[key] += (x * x).reshape(-1, x.shape[-1]).sum(0)
            return hook

        handles = [layer.self_attn.o_proj.register_forward_pre_hook(accumulate("o")),
                   layer.mlp.down_proj.register_forward_pre_hook(accumulate("down"))]
        try:
            for h in hidden:
                _run_layer(layer, h, kwargs)
        finally:
            for handle in handles:
                handle.remove()
        n = calib.shape[0]
        o_w = layer.self_attn.o_proj.weight.detach().to(torch.float64).abs()
        d_w = layer.mlp.down_proj.weight.detach().to(torch.float64).abs()
        o_score = (o_w * (sums["o"] / n).sqrt()).mean(0)  # (H·hd,)
        group_score = o_score.reshape(G, r, hd).sum(-1).mean(-1)  # heads sum features, groups average heads
        channel_score = (d_w * (sums["down"] / n).sqrt()).mean(0)
        metrics["group"].append(group_score.cpu())
        metrics["channel"].append(channel_score.cpu())
        keep_groups = top_per_layer(group_score.cpu().unsqueeze(0), [counts["group"][i]])[0] \
            if "group" in granularity else torch.ones(G, dtype=torch.bool)
        keep_channels = top_per_layer(channel_score.cpu().unsqueeze(0), [counts["channel"][i]])[0] \
            if "channel" in granularity else torch.ones(space.n_channels, dtype=torch.bool)
        masks["group"].append(keep_groups)
        masks["channel"].append(keep_channels)
        # the next layer sees this layer pruned by its init mask
        head_scale = keep_groups.to(device).repeat_interleave(r * hd).float()
        with _scaled_inputs(layer.self_attn.o_proj, head_scale), \
                _scaled_inputs(layer.mlp.down_proj, keep_channels.to(device).float()):
            hidden = [_run_layer(layer, h, kwargs) for h in hidden]
    return ({k: torch.stack(v) for k, v in metrics.items()}, {k: torch.stack(v) for k, v in masks.items()})


# --- the policy's starting point ---------------------------------------------------------------

def initialise(policy: Policy, method: str, model=None, calib: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, Masks | None, dict]:
    """θ to start from (flat, already on the budget), the init mask (S = 1; None for uniform),
    and the raw per-unit metrics (for inspection). Layer units always start uniform: neither
    metric scores whole layers."""
    if method not in INIT_METHODS:
        raise BppError(f"unknown init {method!r}; use one of {', '.join(INIT_METHODS)}")
    space, keep = policy.space, 1.0 - policy.sparsity
    theta = torch.full((policy.n_units,), keep, dtype=torch.float64)
    if method == "uniform" or policy.granularity == ("layer",):
        policy.theta = theta
        policy.project()
        return policy.theta.clone(), None, {}
    if method == "magnitude":
        metrics = magnitude_metric(model, space)
        counts = {"channel": per_layer_counts(round(keep * space.n_layers * space.n_channels), space.n_layers),
                  "group": per_layer_counts(round(keep * space.n_layers * space.n_groups), space.n_layers)}
        layer_masks = {t: top_per_layer(metrics[t], counts[t]) for t in ("channel", "group")}
        probs = {t: sigmap(metrics[t], keep) for t in ("channel", "group")}
    elif method == "wanda-sp":
        if calib is None:
            raise BppError("wanda-sp needs calibration windows")
        metrics, layer_masks = wanda_sp_metric(model, space, calib, keep, policy.granularity)
        probs = {t: sigmap(metrics[t], keep) for t in ("channel", "group")}
    else:
        if calib is None:
            raise BppError(f"{method} needs calibration windows")
        probs, layer_masks, metrics = _companion(COMPANION_INITS[method])(model, space, calib, keep,
                                                                           policy.granularity)
    for t in ("channel", "group"):
        if t in policy.slices:
            theta[policy.slices[t]] = probs[t].to(torch.float64).reshape(-1)
    policy.theta = theta
    policy.project()
    L = space.n_layers
    init_mask = Masks(
        channels=(layer_masks["channel"] if "channel" in policy.granularity
                  else torch.ones(L, space.n_channels, dtype=torch.bool)).unsqueeze(0),
        groups=(layer_masks["group"] if "group" in policy.granularity
                else torch.ones(L, space.n_groups, dtype=torch.bool)).unsqueeze(0),
        layers=torch.ones(1, L, dtype=torch.bool),
    )
    return policy.theta.clone(), init_mask, metrics


def metric_mask(model, space: MaskSpace, method: str, sparsity: float, calib: torch.Tensor | None = None,
                granularity: tuple[str, ...] = ("channel", "group")) -> Masks:
    """The layer-uniform mask of a metric at ``sparsity`` (a baseline of the quality table)."""
    policy = Policy(space, granularity, sparsity)
    _, mask, _ = initialise(policy, method, model, calib)
    if mask is None:
        raise BppError(f"{method} gives no ranking, hence no metric mask")
    return mask
