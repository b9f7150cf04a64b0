"""FLAP (An et al., AAAI 2024), the strongest metric baseline of the PG paper, as a mask.

- Fluctuation metric (WIFV): for each input column j of o_proj / down_proj, the variance of
  that input over the calibration tokens times the squared norm of the weight column,
  S_j = Var_n(X_nj) · ||W_:j||². A KV group scores the sum over its heads' columns.
- Adaptive global structure (FLAP's "AL-AM", as its official code runs it): within each layer
  the scores of a unit type are standardised (zero mean, unit std over that layer's units; for
  attention over its o_proj input columns, then averaged over each KV group's columns), and one
  global ranking of all standardised scores under a joint parameter budget decides how many
  groups and channels each layer keeps (heterogeneous: layers whose score distributions are more
  skewed lose more). Standardising each type across all layers at once instead can empty the
  attention of most layers (bench/RESULTS.md, quality section).
- Bias compensation: what a pruned column contributed on average, W_:j · mean_n(X_nj), is added
  to the output bias at compaction (:func:`compensation_biases`), so the layer's mean output
  is unchanged.
"""
from __future__ import annotations

import torch

from ..errors import BppError
from ..policy import check_sparsity, deterministic_mask
from ..space import Masks, MaskSpace
from .calibration import InputStats


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
    space = MaskSpace.from_model(model)
    channel, columns = _column_fluctuations(model, stats)
    return channel, columns.view(space.n_layers, space.n_groups, -1).sum(-1)


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
    the pruned columns: ``b = W[:, pruned] @ mean(X[:, pruned])`` (zeros when nothing is pruned)."""
    space = MaskSpace.from_model(model)
    masks.validate(space)
    per_head = space.heads_per_group * space.head_dim
    attn_bias, mlp_bias = [], []
    for i, layer in enumerate(model.model.layers):
        pruned_cols = ~masks.groups[0, i].repeat_interleave(per_head)
        w_o = layer.self_attn.o_proj.weight.detach().to(torch.float64)
        attn_bias.append((w_o[:, pruned_cols] @ stats.mean("attn")[i][pruned_cols]).to(w_o.dtype))
        pruned_ch = ~masks.channels[0, i]
        w_down = layer.mlp.down_proj.weight.detach().to(torch.float64)
        mlp_bias.append(w_down[:, pruned_ch] @ stats.mean("mlp")[i][pruned_ch])
    dtype = model.model.layers[0].mlp.down_proj.weight.dtype
    return [b.to(dtype) for b in attn_bias], [b.to(dtype) for b in mlp_bias]


def compensation_for(model, masks: Masks, calib: torch.Tensor, stats: InputStats | None = None) -> dict:
    """FLAP's bias compensation of ``masks`` from one calibration pass over ``calib`` (n, T), as
    the keyword arguments of :func:`bpp.compaction.compact_model` / ``save_compacted``."""
    stats = stats or InputStats(model).collect(calib)
    attn_bias, mlp_bias = compensation_biases(model, masks, stats)
    return {"o_proj_bias": attn_bias, "down_proj_bias": mlp_bias}


def flap_baseline(model, space: MaskSpace, calib: torch.Tensor, sparsity: float) -> Masks:
    """The FLAP mask at ``sparsity`` (the registry's baseline-mask signature)."""
    return flap_mask(model, calib, sparsity)
