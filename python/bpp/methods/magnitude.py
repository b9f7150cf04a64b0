"""Magnitude: a unit's importance is the L2 norm of all the weights it owns (gate and up rows and
the down column of a channel; q/k/v rows and o_proj columns of a KV group). No data."""
from __future__ import annotations

import torch

from ..space import MaskSpace
from .ranking import sigmap, top_per_layer, uniform_counts


@torch.no_grad()
def magnitude_metric(model, space: MaskSpace) -> dict[str, torch.Tensor]:
    """Per-unit scores ``{"channel": (L, m), "group": (L, G)}``, float64."""
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


def magnitude_prior(model, space: MaskSpace, calib, keep: float, granularity):
    """θ per type (sigmap of the metric), the layer-uniform top-k mask per type, the metrics."""
    metrics = magnitude_metric(model, space)
    counts = uniform_counts(space, keep)
    layer_masks = {t: top_per_layer(metrics[t], counts[t]) for t in ("channel", "group")}
    return {t: sigmap(metrics[t], keep) for t in ("channel", "group")}, layer_masks, metrics
