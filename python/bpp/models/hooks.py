"""The ground truth for every masked evaluation: an unpruned Hugging Face model with
multiplicative masks applied by hooks (zeroed head outputs before o_proj, zeroed channels
before down_proj, skipped layers). It computes everything, so it is slow; it is what the
paper's official code does, and what the batched engine and compaction must match."""
from __future__ import annotations

import contextlib

import torch

from ..masks import Masks
from ..space import MaskSpace


@contextlib.contextmanager
def hook_masks(model, masks: Masks):
    """Within the block, ``model`` behaves as pruned by the single mask ``masks`` (S == 1)."""
    space = MaskSpace.from_model(model)
    masks.validate(space)
    if masks.S != 1:
        raise ValueError(f"hook_masks takes one mask (S == 1), got S={masks.S}")
    handles = []
    kept_heads = masks.kept_heads(space.heads_per_group)[0]  # (L, G, r): groups and query-head slots
    for i, layer in enumerate(model.model.layers):
        dtype = layer.mlp.down_proj.weight.dtype
        channel_scale = masks.channels[0, i].to(dtype)
        head_scale = kept_heads[i].reshape(-1).to(dtype).repeat_interleave(space.head_dim)

        def scale_input(scale):
            return lambda module, args: (args[0] * scale.to(args[0].device),) + tuple(args[1:])

        handles.append(layer.mlp.down_proj.register_forward_pre_hook(scale_input(channel_scale)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(scale_input(head_scale)))
        if not bool(masks.layers[0, i]):
            handles.append(layer.register_forward_hook(lambda module, args, output: args[0]))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def hook_losses(model, input_ids: torch.Tensor, masks: Masks) -> torch.Tensor:
    """``(S,)`` float32 mean next-token NLL per mask: one full Hugging Face forward per mask."""
    out = []
    for s in range(masks.S):
        with hook_masks(model, masks[s]):
            logits = model(input_ids).logits[:, :-1].float()
        out.append(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1)))
    return torch.stack(out)
