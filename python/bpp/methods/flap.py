"""FLAP (An et al., AAAI 2024), the strongest metric baseline of the PG paper, as a mask.

- Fluctuation metric (WIFV): for each input column j of o_proj / down_proj, the variance of
  that input over the calibration tokens times the squared norm of the weight column,
  S_j = Var_n(X_nj) · ||W_:j||². A KV group scores the sum over its heads' columns; a query-head
  slot (head j of every group) the sum over its heads' columns in all groups.
- Adaptive global structure (FLAP's "AL-AM", as its official code runs it): within each layer
  the scores of a unit type are standardised (zero mean, unit std over that layer's units; for
  attention over its o_proj input columns, then averaged over each KV group's columns), and one
  global ranking of all standardised scores under a joint parameter budget decides how many
  groups and channels each layer keeps (heterogeneous: layers whose score distributions are more
  skewed lose more). Standardising each type across all layers at once instead can empty the
  attention of most layers (bench/RESULTS.md, quality section).
- As a starting point of ``bpp prune`` (``--init flap``, :func:`flap_prior`): FLAP's mask is the
  init mask (and the first incumbent), its fluctuation scores rank the units inside each layer,
  and for the per-unit policy its standardised scores become keep-probabilities by the official
  sigmap mapping, each layer at the keep rate FLAP chose for it. With only one unit type learned,
  that type alone meets its share of the budget (the other stays whole).
- Bias compensation: what a pruned column contributed on average, W_:j · mean_n(X_nj), is added
  to the output bias at compaction (:func:`compensation_biases`), so the layer's mean output
  is unchanged.
"""
from __future__ import annotations

import torch

from ..bias_compensation import BiasCompensation, InputStats
from ..budget import check_sparsity, deterministic_mask, parse_granularity
from ..errors import BppError
from ..masks import Masks
from ..space import MaskSpace
from .ranking import per_layer_counts, sigmap, top_per_layer

TYPES = ("channel", "group")


def _column_fluctuations(model, stats: InputStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Var_n(X_nj)·||W_:j||² per input column of down_proj ``(L, m)`` and of o_proj ``(L, H·hd)``."""
    channel, columns = [], []
    for i, layer in enumerate(model.model.layers):
        w_down = layer.mlp.down_proj.weight.detach().to(torch.float64)
        channel.append(stats.variance("mlp")[i] * w_down.pow(2).sum(0))
        w_o = layer.self_attn.o_proj.weight.detach().to(torch.float64)
        columns.append(stats.variance("attn")[i] * w_o.pow(2).sum(0))
    return torch.stack(channel), torch.stack(columns)


def flap_scores(model, stats: InputStats) -> tuple[torch.Tensor, torch.Tensor]:
    """WIFV fluctuation scores: channels ``(L, m)`` and KV groups ``(L, G)``, float64."""
    scores = flap_unit_scores(model, stats)
    return scores["channel"], scores["group"]


def flap_head_scores(model, stats: InputStats) -> torch.Tensor:
    """WIFV fluctuation scores of query-head slots ``(L, r)``, float64: slot j sums the o_proj input
    columns of head j in every KV group."""
    return flap_unit_scores(model, stats)["head"]


def flap_unit_scores(model, stats: InputStats) -> dict[str, torch.Tensor]:
    """The WIFV scores of every unit type from one pass over the weights: ``channel (L, m)``,
    ``group (L, G)`` and query-head slots ``head (L, r)``, float64."""
    space = MaskSpace.from_model(model)
    channel, columns = _column_fluctuations(model, stats)
    L, G, r = space.n_layers, space.n_groups, space.heads_per_group
    return {"channel": channel, "group": columns.view(L, G, -1).sum(-1),
            "head": columns.view(L, G, r, -1).sum((1, 3))}


def flap_slot_prior(model, space: MaskSpace, calib: torch.Tensor, keep: float):
    """Query-head slots for the per-unit policy (``--policy units --attention-units heads``): θ
    ``(L, r)`` by the official sigmap of each layer's slot fluctuations at ``keep``, the mask keeping
    the top slots of every layer at layer-uniform counts ``(L, r)`` bool, and the scores."""
    scores = flap_head_scores(model, InputStats(model).collect(calib))
    theta = torch.stack([sigmap(scores[i].unsqueeze(0), keep)[0] for i in range(space.n_layers)])
    counts = per_layer_counts(round(keep * scores.numel()), space.n_layers)
    return theta, top_per_layer(scores, counts), scores


def _standardise_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row (one layer) to zero mean and unit standard deviation (a constant row: zeros)."""
    std = x.std(-1, keepdim=True)
    return (x - x.mean(-1, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))


def flap_alam_scores(model, stats: InputStats) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores FLAP's AL-AM ranks globally: channels ``(L, m)`` and KV groups ``(L, G)``, each
    standardised within its layer (attention: per o_proj input column, then the mean over a
    group's columns)."""
    space = MaskSpace.from_model(model)
    channel, columns = _column_fluctuations(model, stats)
    group = _standardise_rows(columns).view(space.n_layers, space.n_groups, -1).mean(-1)
    return _standardise_rows(channel), group


def flap_mask(model, input_ids: torch.Tensor, sparsity: float, stats: InputStats | None = None) -> Masks:
    """The FLAP mask at ``sparsity`` of the prunable (group + channel) parameters (S = 1)."""
    sparsity = check_sparsity(sparsity)
    space = MaskSpace.from_model(model)
    stats = stats or InputStats(model).collect(input_ids)
    channel, group = flap_alam_scores(model, stats)
    scores = torch.cat([channel.flatten(), group.flatten()])
    costs = torch.cat([torch.full((channel.numel(),), float(space.channel_params), dtype=torch.float64),
                       torch.full((group.numel(),), float(space.group_params), dtype=torch.float64)])
    keep = deterministic_mask(scores, costs, (1.0 - sparsity) * float(costs.sum()))
    if not keep.any():
        raise BppError(f"sparsity {sparsity:g} leaves no unit of the model")
    L = space.n_layers
    channels = keep[: channel.numel()].view(1, L, space.n_channels)
    groups = keep[channel.numel():].view(1, L, space.n_groups)
    return Masks(channels, groups, torch.ones(1, L, dtype=torch.bool))


def compensation_biases(model, masks: Masks, stats: InputStats) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the output biases of o_proj and down_proj that restore the mean contribution of
    the pruned columns: ``b = W[:, pruned] @ mean(X[:, pruned])`` (zeros when nothing is pruned),
    for one mask (S = 1), in the model's dtype (:func:`bpp.bias_compensation.output_biases`)."""
    biases = BiasCompensation.from_stats(model, stats).compact_biases(masks)
    return biases["o_proj_bias"], biases["down_proj_bias"]


def compensation_for(model, masks: Masks, calib: torch.Tensor, stats: InputStats | None = None) -> dict:
    """FLAP's bias compensation of ``masks`` from one calibration pass over ``calib`` (n, T), as
    the keyword arguments of :func:`bpp.compaction.compact_model` / ``save_compacted``."""
    stats = stats or InputStats(model).collect(calib)
    attn_bias, mlp_bias = compensation_biases(model, masks, stats)
    return {"o_proj_bias": attn_bias, "down_proj_bias": mlp_bias}


def flap_baseline(model, space: MaskSpace, calib: torch.Tensor, sparsity: float) -> Masks:
    """The FLAP mask at ``sparsity`` (the registry's baseline-mask signature)."""
    return flap_mask(model, calib, sparsity)


def flap_allocate(model, space: MaskSpace, stats: InputStats, keep: float, granularity) -> dict[str, torch.Tensor]:
    """FLAP's (L, n) bool masks per type keeping ``keep`` of the learned types' parameters."""
    learned = [t for t in TYPES if t in parse_granularity(granularity)]
    alam = dict(zip(TYPES, flap_alam_scores(model, stats)))
    cost = {"channel": float(space.channel_params), "group": float(space.group_params)}
    scores = torch.cat([alam[t].flatten() for t in learned])
    costs = torch.cat([torch.full((alam[t].numel(),), cost[t], dtype=torch.float64) for t in learned])
    keep_flat = deterministic_mask(scores, costs, keep * float(costs.sum()))
    masks, start = {}, 0
    for t in TYPES:
        if t in learned:
            n = alam[t].numel()
            masks[t] = keep_flat[start:start + n].view(alam[t].shape)
            start += n
        else:
            masks[t] = torch.ones(alam[t].shape, dtype=torch.bool)
    return masks


def flap_prior(model, space: MaskSpace, calib: torch.Tensor, keep: float, granularity):
    """θ per type (L, n), FLAP's mask per type (L, n) bool, and the metrics (the registry's prior
    signature, :mod:`bpp.methods`)."""
    stats = InputStats(model).collect(calib)
    masks = flap_allocate(model, space, stats, keep, granularity)
    raw = dict(zip(TYPES, flap_scores(model, stats)))
    alam = dict(zip(TYPES, flap_alam_scores(model, stats)))
    learned = parse_granularity(granularity)
    theta = {}
    for t in TYPES:
        if t in learned:
            rates = masks[t].double().mean(-1)
            theta[t] = torch.stack([sigmap(alam[t][i].unsqueeze(0), float(rates[i]))[0] for i in range(space.n_layers)])
        else:
            theta[t] = torch.ones_like(alam[t])
    metrics = {**raw, "channel_standardised": alam["channel"], "group_standardised": alam["group"]}
    return theta, masks, metrics
