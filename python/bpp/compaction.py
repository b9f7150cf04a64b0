"""Final mask → dense, physically smaller weights → a model folder that loads anywhere.

Kept rows of q/k/v (whole KV groups with their kept query-head slots) and of gate/up, kept
columns of o_proj and down_proj; dropped layers removed and the rest renumbered; biases and q/k norms
carried along. When every kept layer keeps the same numbers of groups, query heads per group and
channels (none zero),
the result is the stock Hugging Face model with a smaller stock config; otherwise it is the
stock model with per-layer sizes, defined by ``modeling_bpp.py`` shipped in the folder
(``trust_remote_code=True``, no bpp needed to load it).
"""
from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from .errors import BppError
from .model_folders import save_model_folder
from .modelio import MODELING_FILE, modeling_module
from .masks import Masks
from .space import MaskSpace, block_norms

# transform(src, new, eff, kept_layers) -> dict: changes the compacted model ``new`` in place
# (e.g. Pangu Light's re-initialisations) and says what it did
Transform = Callable[..., dict]


def _no_init():
    """Skip the random initialisation of weights that are overwritten anyway (minutes on a 7B model)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def kept_layers(eff: Masks, keep_empty: bool = False) -> list[int]:
    """Original indices of the layers the compacted model has. A kept layer whose groups and
    channels are all pruned computes the identity, so it goes too, unless compensation biases
    make it add a constant (``keep_empty``)."""
    return [i for i in range(eff.layers.shape[1])
            if bool(eff.layers[0, i]) and (keep_empty or bool(eff.groups[0, i].any() or eff.channels[0, i].any()))]


def _check_mask(space: MaskSpace, masks: Masks) -> Masks:
    masks.validate(space)
    if masks.S != 1:
        raise BppError(f"compaction takes one mask (S = 1), got {masks.S}")
    eff = masks.effective()
    if not eff.layers.any() or not (eff.channels.any() or eff.groups.any()):
        raise BppError("the mask keeps nothing (no layer with a kept group or channel): nothing to compact")
    return eff


def _check_weights(space: MaskSpace, eff: Masks, o_proj_weight, down_proj_weight) -> None:
    """Refit output weights: one entry per layer of the original model, None (keep the kept columns
    as they are) or ``(d, kept inputs)`` for that layer under the mask."""
    kept_inputs = {"o_proj_weight": eff.kept_heads(space.heads_per_group)[0].flatten(1).sum(-1) * space.head_dim,
                   "down_proj_weight": eff.channels[0].sum(-1)}
    for name, weights in (("o_proj_weight", o_proj_weight), ("down_proj_weight", down_proj_weight)):
        if weights is None:
            continue
        if len(weights) != space.n_layers:
            raise BppError(f"{name} must hold one entry per layer ({space.n_layers}), got {len(weights)}")
        for i, w in enumerate(weights):
            want = (space.hidden_size, int(kept_inputs[name][i]))
            if w is not None and tuple(w.shape) != want:
                raise BppError(f"{name}[{i}] has shape {tuple(w.shape)}, but the mask keeps {want[1]} inputs "
                               f"of that layer: expected {want} (or None to keep the original columns)")


def compact_model(model, masks: Masks, *, o_proj_bias: list[torch.Tensor] | None = None,
                  down_proj_bias: list[torch.Tensor] | None = None,
                  o_proj_weight: list[torch.Tensor | None] | None = None,
                  down_proj_weight: list[torch.Tensor | None] | None = None, transform: Transform | None = None):
    """A new, smaller model equal to ``model`` under the single mask ``masks``; ``model`` is untouched.

    ``o_proj_bias`` / ``down_proj_bias``: optional per-layer output biases (one ``(d,)`` tensor
    per layer of the original model, e.g. FLAP bias compensation); they force per-layer config.
    ``o_proj_weight`` / ``down_proj_weight``: optional refit kept columns, one entry per layer of
    the original model, None or ``(d, kept inputs)`` (:func:`bpp.reconstruction.reconstruct`).
    ``transform(model, new, eff, kept_layers)`` changes the compacted weights in place afterwards
    (e.g. :func:`bpp.methods.pangu.transform`); what it returns is stored as ``new.bpp_transform``."""
    space = MaskSpace.from_model(model)
    eff = _check_mask(space, masks)
    for name, biases in (("o_proj_bias", o_proj_bias), ("down_proj_bias", down_proj_bias)):
        if biases is not None and (len(biases) != space.n_layers
                                   or any(tuple(b.shape) != (space.hidden_size,) for b in biases)):
            raise BppError(f"{name} must hold one ({space.hidden_size},) tensor per layer ({space.n_layers})")
    _check_weights(space, eff, o_proj_weight, down_proj_weight)
    biased = o_proj_bias is not None or down_proj_bias is not None
    kept = kept_layers(eff, keep_empty=biased)
    groups = [int(eff.groups[0, i].sum()) for i in kept]
    channels = [int(eff.channels[0, i].sum()) for i in kept]
    slots = [heads_per_group(space, eff, i) for i in kept]
    uniform = len(set(groups)) == 1 and len(set(channels)) == 1 and len(set(slots)) == 1 and groups[0] > 0 \
        and channels[0] > 0

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(kept)
    config.head_dim = space.head_dim
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
    if uniform and not biased:
        config.num_key_value_heads, config.num_attention_heads = groups[0], groups[0] * slots[0]
        config.intermediate_size = channels[0]
        from transformers import AutoModelForCausalLM

        with _no_init():
            new = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    else:
        module = modeling_module(space.family)
        fields = config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            fields.pop(key, None)
        per_layer_heads = {} if eff.heads is None else {"heads_per_group_per_layer": slots}
        config = module.BppPrunedConfig(kv_heads_per_layer=groups, intermediate_size_per_layer=channels,
                                        o_proj_bias=o_proj_bias is not None, down_proj_bias=down_proj_bias is not None,
                                        **per_layer_heads, **fields)
        config.architectures = ["BppPrunedForCausalLM"]
        config.auto_map = {"AutoConfig": f"{MODELING_FILE[:-3]}.BppPrunedConfig",
                           "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.BppPrunedForCausalLM"}
        with _no_init():
            new = module.BppPrunedForCausalLM._from_config(config, dtype=model.dtype)
    new.generation_config = copy.deepcopy(model.generation_config)
    if getattr(new.config, "tie_word_embeddings", False):
        new.tie_weights()  # built under _no_init the LM head is not tied yet: it would stay zeros
    _copy_weights(model, new, eff, kept, space, o_proj_bias, down_proj_bias, o_proj_weight, down_proj_weight)
    done = transform(model, new, eff, kept) if transform is not None else None
    new = new.to(model.device).eval()
    new.bpp_transform = done
    return new


def heads_per_group(space: MaskSpace, eff: Masks, layer: int) -> int:
    """Query heads each kept KV group of ``layer`` keeps in the compacted model (its kept slots; r
    without slots, 0 for a layer without attention)."""
    if not bool(eff.groups[0, layer].any()):
        return 0
    return space.heads_per_group if eff.heads is None else int(eff.heads[0, layer].sum())


@torch.no_grad()
def _copy_weights(src, dst, eff: Masks, kept_layers, space: MaskSpace, o_proj_bias, down_proj_bias,
                  o_proj_weight=None, down_proj_weight=None) -> None:
    G, r, hd, d = space.n_groups, space.heads_per_group, space.head_dim, space.hidden_size
    kept_heads = eff.kept_heads(r)[0]  # (L, G, r): a kept group's kept slots
    dst.model.embed_tokens.weight.copy_(src.model.embed_tokens.weight)
    dst.model.norm.weight.copy_(src.model.norm.weight)
    if not src.config.tie_word_embeddings:
        dst.lm_head.weight.copy_(src.lm_head.weight)
    for new_idx, old_idx in enumerate(kept_layers):
        s_layer, d_layer = src.model.layers[old_idx], dst.model.layers[new_idx]
        attn_norms, mlp_norms = block_norms(s_layer)
        g = eff.groups[0, old_idx]
        if g.any():
            sa, da = s_layer.self_attn, d_layer.self_attn
            for name in attn_norms:
                getattr(d_layer, name).weight.copy_(getattr(s_layer, name).weight)
            q = kept_heads[old_idx]  # group-major, slot-minor: Hugging Face's order of the kept query heads
            da.q_proj.weight.copy_(sa.q_proj.weight.view(G, r, hd, d)[q].reshape(-1, d))
            da.k_proj.weight.copy_(sa.k_proj.weight.view(G, hd, d)[g].reshape(-1, d))
            da.v_proj.weight.copy_(sa.v_proj.weight.view(G, hd, d)[g].reshape(-1, d))
            if o_proj_weight is not None and o_proj_weight[old_idx] is not None:
                da.o_proj.weight.copy_(o_proj_weight[old_idx])
            else:
                da.o_proj.weight.copy_(sa.o_proj.weight.view(d, G, r, hd)[:, q].reshape(d, -1))
            for name, kept in (("q_proj", q), ("k_proj", g), ("v_proj", g)):
                bias = getattr(sa, name).bias
                if bias is not None:
                    getattr(da, name).bias.copy_(bias.view(*kept.shape, hd)[kept].reshape(-1))
            for name in ("q_norm", "k_norm"):
                if hasattr(sa, name):
                    getattr(da, name).weight.copy_(getattr(sa, name).weight)
            if o_proj_bias is not None:
                da.o_proj.bias.copy_(o_proj_bias[old_idx])
        elif o_proj_bias is not None:  # no head left: the block outputs its compensation, a constant
            d_layer.self_attn.bias.copy_(_after_block(s_layer, attn_norms, o_proj_bias[old_idx]))
        ch = eff.channels[0, old_idx]
        if ch.any():
            sm, dm = s_layer.mlp, d_layer.mlp
            for name in mlp_norms:
                getattr(d_layer, name).weight.copy_(getattr(s_layer, name).weight)
            dm.gate_proj.weight.copy_(sm.gate_proj.weight[ch])
            dm.up_proj.weight.copy_(sm.up_proj.weight[ch])
            if down_proj_weight is not None and down_proj_weight[old_idx] is not None:
                dm.down_proj.weight.copy_(down_proj_weight[old_idx])
            else:
                dm.down_proj.weight.copy_(sm.down_proj.weight[:, ch])
            if down_proj_bias is not None:
                dm.down_proj.bias.copy_(down_proj_bias[old_idx])
        elif down_proj_bias is not None:
            d_layer.mlp.bias.copy_(_after_block(s_layer, mlp_norms, down_proj_bias[old_idx]))


def _after_block(layer, norms: tuple[str, ...], bias: torch.Tensor) -> torch.Tensor:
    """What an emptied block that outputs the constant ``bias`` adds to the residual: the bias,
    through the norm after the block where there is one (Gemma 3)."""
    return getattr(layer, norms[1])(bias) if len(norms) > 1 else bias


ROUND_TO = (8, 16, 32, 64, 128)


def round_mask(masks: Masks, multiple: int, channel_scores: torch.Tensor | None = None) -> Masks:
    """Round each layer's kept channel count up to a multiple of ``multiple`` (at most all m;
    a layer with none kept stays empty), adding the pruned channels with the highest
    ``channel_scores`` ``(L, m)`` first (θ, or a magnitude metric; ties and no scores: lower index).

    KV groups are not rounded: a group is already (r + 2)·head_dim rows, whole head tiles, and
    models have few of them (rounding 3 groups up to 8 would undo the pruning)."""
    if multiple not in ROUND_TO:
        raise BppError(f"--round-to must be one of {', '.join(map(str, ROUND_TO))}, got {multiple}")
    channels = masks.channels.clone()
    S, L, m = channels.shape
    if channel_scores is not None and tuple(channel_scores.shape) != (L, m):
        raise BppError(f"channel scores have shape {tuple(channel_scores.shape)}, the mask needs {(L, m)}")
    for s in range(S):
        for i in range(L):
            kept = int(channels[s, i].sum())
            target = min(m, -(-kept // multiple) * multiple)
            if target > kept:
                score = (channel_scores[i].double() if channel_scores is not None
                         else torch.zeros(m, dtype=torch.float64))
                score = score.masked_fill(channels[s, i], float("-inf"))
                channels[s, i, torch.sort(-score, stable=True).indices[: target - kept]] = True
    return replace(masks, channels=channels, groups=masks.groups.clone(), layers=masks.layers.clone())


def layer_sizes(space: MaskSpace, masks: Masks, keep_empty: bool = False) -> list[dict]:
    """Per layer of the compacted model: its index in the original model, kept KV groups,
    query heads and MLP channels (what ``bpp_compaction.json`` and the CLI report)."""
    eff = masks.effective()
    return [{"layer": i, "kv_groups": int(eff.groups[0, i].sum()),
             "query_heads": int(eff.groups[0, i].sum()) * heads_per_group(space, eff, i),
             "channels": int(eff.channels[0, i].sum())} for i in kept_layers(eff, keep_empty)]


def save_compacted(model, masks: Masks, out: str | Path, *, tokenizer=None, force: bool = False,
                   o_proj_bias=None, down_proj_bias=None, o_proj_weight=None, down_proj_weight=None,
                   info: dict | None = None,
                   transform: Transform | None = None, compacted=None, protected: tuple = ()) -> Path:
    """Compact ``model`` under ``masks`` and save it to ``out`` (safetensors, config, generation
    config, tokenizer, ``modeling_bpp.py`` when layers differ, and ``bpp_compaction.json``: the
    per-layer sizes, parameter counts, what ``transform`` did, and ``info``). Written to a
    temporary folder and renamed, so a failure leaves nothing half-written. Biases and refit
    weights as :func:`compact_model` takes them. ``compacted``: the result of :func:`compact_model`
    with the same arguments, when the caller already has it; ``protected``: inputs ``out`` must
    not hold (the source model's folder)."""
    from .runs import check_model_folder_target

    out = Path(out)
    check_model_folder_target(out, force=force, protected=protected)  # before the work
    if compacted is None:
        compacted = compact_model(model, masks, o_proj_bias=o_proj_bias, down_proj_bias=down_proj_bias,
                                  o_proj_weight=o_proj_weight, down_proj_weight=down_proj_weight, transform=transform)
    space = MaskSpace.from_model(model)
    biased = o_proj_bias is not None or down_proj_bias is not None
    reconstructed = o_proj_weight is not None or down_proj_weight is not None
    record = {"original_params": space.total_params,
              "params": sum(p.numel() for p in compacted.parameters()),
              "stock_config": not getattr(compacted.config, "auto_map", None),
              "bias_compensation": biased and not reconstructed,
              "reconstructed": reconstructed,
              "layers": layer_sizes(space, masks, keep_empty=biased), **(info or {})}
    if compacted.bpp_transform:
        record.update(compacted.bpp_transform)
    return save_model_folder(compacted, out, tokenizer=tokenizer, force=force, protected=protected,
                             extra_files={"bpp_compaction.json": json.dumps(record, indent=2) + "\n"})
