"""wanda-sp (the official initialisation of the policy-gradient method): activation × weight at
the inputs of o_proj and down_proj, |W_ij|·sqrt(Σ_tokens x_j² / n_windows), averaged over the
output rows i, so every input feature j gets a score; a channel is one down_proj input; a head
sums its head_dim features and a KV group averages its query heads. As in the official code (and
Wanda), layers are processed in order and each layer's calibration input is the output of the
layers before it *with their init masks applied*, so the metric sees the model it will prune."""
from __future__ import annotations

import torch

from ..errors import BppError
from ..models.replay import layer_inputs, run_layer
from ..space import MaskSpace
from .calibration import input_scales, input_squares, wanda_sp_scores
from .ranking import sigmap, top_per_layer, uniform_counts


@torch.no_grad()
def wanda_sp_metric(model, space: MaskSpace, calib: torch.Tensor, keep: float, granularity: tuple[str, ...],
                    chunk: int = 8) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-unit wanda-sp scores ``{"channel": (L, m), "group": (L, G)}`` and the per-layer init
    masks used to feed the next layers (types not in ``granularity`` stay fully kept)."""
    G = space.n_groups
    device = next(model.parameters()).device
    hidden, kwargs = [], None
    for start in range(0, calib.shape[0], chunk):
        h, kw = layer_inputs(model, calib[start:start + chunk].to(device))
        hidden.append(h)
        kwargs = kw  # the same for every chunk of equal shape
    counts = uniform_counts(space, keep)
    metrics = {"channel": [], "group": []}
    masks = {"channel": [], "group": []}
    for i, layer in enumerate(model.model.layers):
        with input_squares(layer, space) as sums:
            for h in hidden:
                run_layer(layer, h, kwargs)
        scores = wanda_sp_scores(layer, space, sums["o"], sums["down"], calib.shape[0])
        metrics["group"].append(scores["group"])
        metrics["channel"].append(scores["channel"])
        keep_groups = top_per_layer(scores["group"].unsqueeze(0), [counts["group"][i]])[0] \
            if "group" in granularity else torch.ones(G, dtype=torch.bool)
        keep_channels = top_per_layer(scores["channel"].unsqueeze(0), [counts["channel"][i]])[0] \
            if "channel" in granularity else torch.ones(space.n_channels, dtype=torch.bool)
        masks["group"].append(keep_groups)
        masks["channel"].append(keep_channels)
        # the next layer sees this layer pruned by its init mask
        with input_scales(layer, keep_groups.to(device).float(), keep_channels.to(device).float(),
                          space.heads_per_group * space.head_dim):
            hidden = [run_layer(layer, h, kwargs) for h in hidden]
    return ({k: torch.stack(v) for k, v in metrics.items()}, {k: torch.stack(v) for k, v in masks.items()})


def wanda_sp_prior(model, space: MaskSpace, calib: torch.Tensor, keep: float, granularity):
    """θ per type (sigmap of the metric), the layer-uniform init mask per type, the metrics."""
    if calib is None:
        raise BppError("wanda-sp needs calibration windows")
    metrics, layer_masks = wanda_sp_metric(model, space, calib, keep, granularity)
    return {t: sigmap(metrics[t], keep) for t in ("channel", "group")}, layer_masks, metrics
