"""From unit scores to masks and keep-probabilities: the official "sigmap" mapping, keep counts
spread over layers, and the top units of each layer."""
from __future__ import annotations

import torch


def sigmap(metric: torch.Tensor, keep: float) -> torch.Tensor:
    """The official mapping of scores to probabilities, row by row (one row = one layer): z-score
    the metric, apply the sigmoid, shift so the mean equals ``keep``, clamp to [0, 1]. A row of
    one unit (a layer with one KV group, as Gemma 3 270M) has no spread: its unit gets ``keep``."""
    metric = metric.to(torch.float64)
    spread = metric.std(-1, keepdim=True) if metric.shape[-1] > 1 else torch.zeros_like(metric[..., :1])
    z = (metric - metric.mean(-1, keepdim=True)) / (spread + 1e-8)
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


def uniform_counts(space, keep: float) -> dict[str, list[int]]:
    """Per type, the layer-uniform keep counts of a mask that keeps ``keep`` of every type's units
    (the per-type counts of a policy-gradient mask at that sparsity)."""
    L = space.n_layers
    return {"channel": per_layer_counts(round(keep * L * space.n_channels), L),
            "group": per_layer_counts(round(keep * L * space.n_groups), L)}
