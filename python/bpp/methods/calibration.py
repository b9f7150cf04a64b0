"""What the calibrated methods share: the inputs of each decoder layer, running one layer on them,
masking a layer's units by scaling the inputs of its output projections, and statistics of those
inputs (per-column moments over the calibration tokens, the wanda-sp unit scores). The same layers
through bpp_kernels' masked ops are in :mod:`bpp.models.blocks`.

Every method of :mod:`bpp.methods` that needs calibration data builds on these functions; none
reaches into another method's private helpers.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..errors import BppError
from ..space import MaskSpace


def check_calib(model, calib, method: str) -> torch.Tensor:
    """``calib`` as an ``(n, T)`` int64 tensor of token ids within the model's vocabulary."""
    if not torch.is_tensor(calib) or calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32):
        raise BppError(f"{method} needs calibration windows as an (n, T) integer tensor of token ids")
    if calib.shape[0] < 1 or calib.shape[1] < 1:
        raise BppError(f"{method} needs at least one calibration window of at least one token, got shape "
                       f"{tuple(calib.shape)}")
    vocab = model.get_input_embeddings().num_embeddings
    if int(calib.min()) < 0 or int(calib.max()) >= vocab:
        raise BppError(f"calibration token ids must lie in [0, {vocab}); got [{int(calib.min())}, {int(calib.max())}]")
    return calib.long()


# --- layer by layer ----------------------------------------------------------------------------

@contextlib.contextmanager
def eval_mode(module):
    """Run ``module`` in eval mode and give every submodule its own training flag back."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _as_getter(scale) -> Callable[[], torch.Tensor]:
    return scale if callable(scale) else (lambda: scale)


@contextlib.contextmanager
def input_scales(layer, group_scale, channel_scale, cols_per_group: int):
    """Within the block, multiply the o_proj inputs by the per-group scale (each group's columns)
    and the down_proj inputs by the per-channel scale (zero = pruned). A scale is a tensor or a
    function returning one (read at every forward, e.g. a mask being learned); ``None`` leaves
    that projection alone."""
    handles = []

    def scaler(get):
        def hook(module, args):
            return (args[0] * get().to(args[0].dtype),) + tuple(args[1:])
        return hook

    if group_scale is not None:
        get_group = _as_getter(group_scale)
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
            scaler(lambda: get_group().repeat_interleave(cols_per_group))))
    if channel_scale is not None:
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(scaler(_as_getter(channel_scale))))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --- statistics of the output projections' inputs -----------------------------------------------

@contextlib.contextmanager
def input_squares(layer, space: MaskSpace):
    """Accumulates Σ x² per input column of the layer's o_proj (``"o"``) and down_proj
    (``"down"``) over every forward inside the block (float64)."""
    device = layer.mlp.down_proj.weight.device
    sums = {"o": torch.zeros(space.n_groups * space.heads_per_group * space.head_dim, dtype=torch.float64,
                             device=device),
            "down": torch.zeros(space.n_channels, dtype=torch.float64, device=device)}

    def accumulate(key):
        def hook(module, args):
            x = args[0].detach().to(torch.float64)
            sums[key] += (x * x).reshape(-1, x.shape[-1]).sum(0)
        return hook

    handles = [layer.self_attn.o_proj.register_forward_pre_hook(accumulate("o")),
               layer.mlp.down_proj.register_forward_pre_hook(accumulate("down"))]
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


def wanda_sp_scores(layer, space: MaskSpace, squares_o: torch.Tensor | None, squares_down: torch.Tensor | None,
                    n: int) -> dict[str, torch.Tensor]:
    """The wanda-sp unit scores of one layer from Σ x² of its output projections' inputs over
    ``n`` rows: |W_ij|·sqrt(Σ x_j² / n) averaged over the output rows i; a channel is one down_proj
    input; a head sums its head_dim features and a KV group averages its query heads. float64, on
    the CPU; a type whose squares are ``None`` is left out."""
    G, r, hd = space.n_groups, space.heads_per_group, space.head_dim
    out = {}
    if squares_o is not None:
        o_w = layer.self_attn.o_proj.weight.detach().to(torch.float64).abs()
        o_score = (o_w * (squares_o.to(o_w.device) / n).sqrt()).mean(0)  # (H·hd,)
        out["group"] = o_score.reshape(G, r, hd).sum(-1).mean(-1).cpu()
    if squares_down is not None:
        d_w = layer.mlp.down_proj.weight.detach().to(torch.float64).abs()
        out["channel"] = (d_w * (squares_down.to(d_w.device) / n).sqrt()).mean(0).cpu()
    return out


# --- decoder blocks through bpp_kernels' masked ops (the gradient paths of BESA, recovery, LoRAPrune) ---
