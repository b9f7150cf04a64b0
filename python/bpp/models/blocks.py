"""Decoder layers run through bpp_kernels' masked ops, differentiably: a layer's weights packed
once (:func:`pack_block`), the layer under S masks (:func:`kernel_block`), the final norm, LM
head and loss (:func:`kernel_lm_loss`). Methods that take gradients (BESA, LoRAPrune, LoRA
recovery) use them where the ops compute what the Hugging Face modules do
(:func:`kernel_blocks_unsupported`, :func:`choose_engine`: the engines in
:data:`GRADIENT_ENGINES`)."""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import BppError

GRADIENT_ENGINES = ("auto", "kernels", "hf")


def _is_linear(module) -> bool:
    return isinstance(getattr(module, "base_layer", module), torch.nn.Linear)


def _bias(module) -> torch.Tensor | None:
    """A projection's bias (a peft LoRA layer's base layer's), or an emptied block's constant; detached."""
    bias = getattr(getattr(module, "base_layer", module), "bias", None)
    return None if bias is None else bias.detach()


def norm_eps(norm) -> float | None:
    """An RMSNorm's epsilon, or None for something that is not one."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return None if eps is None or not hasattr(norm, "weight") else float(eps)


def kernel_blocks_unsupported(model, seq_len: int, training: bool = False, lm_head: bool = False) -> str | None:
    """Why bpp_kernels' masked ops cannot compute ``model``'s decoder blocks exactly as its Hugging
    Face modules do on windows of ``seq_len`` tokens without padding (``training``: in train mode;
    ``lm_head``: the final norm and LM head too, as :func:`kernel_lm_loss`); None when they can.
    Emptied blocks of a compacted model (no attention, no MLP) and output biases of o_proj /
    down_proj are expressible; q/k/v biases and q/k norms are the ops' own."""
    from ..modelio import SUPPORTED_FAMILIES

    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED_FAMILIES:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {', '.join(SUPPORTED_FAMILIES)}"
    if config.model_type == "gemma3_text":
        return "Gemma 3's blocks (GELU-tanh MLP, norms after attention and MLP) are not among bpp_kernels' ops yet"
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        return f"the MLP activation is {config.hidden_act}, not SiLU"
    if training and float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        return "attention dropout is on while training"
    if lm_head and (norm_eps(model.model.norm) is None or not isinstance(model.lm_head, torch.nn.Linear)
                    or model.lm_head.bias is not None):
        return "the final norm is not an RMSNorm or the LM head is not a bias-free linear layer"
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if hasattr(attn, "q_proj"):
            if not all(_is_linear(getattr(attn, n, None)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
                return f"layer {i}'s attention projections are not linear layers"
            if norm_eps(layer.input_layernorm) is None:
                return f"layer {i}'s input norm is not an RMSNorm"
            window = getattr(attn, "sliding_window", getattr(config, "sliding_window", None))
            if window is not None and getattr(config, "use_sliding_window", True) and seq_len > int(window):
                return f"layer {i} attends within a sliding window of {window} tokens, shorter than {seq_len}"
        elif type(attn).__name__ != "NoAttention":
            return f"layer {i}'s attention ({type(attn).__name__}) has no q/k/v/o projections"
        if hasattr(mlp, "gate_proj"):
            if not all(_is_linear(getattr(mlp, n, None)) for n in ("gate_proj", "up_proj", "down_proj")):
                return f"layer {i}'s MLP projections are not linear layers"
            if any(_bias(getattr(mlp, n)) is not None for n in ("gate_proj", "up_proj")):
                return f"layer {i}'s gate/up projections have biases"
            if norm_eps(layer.post_attention_layernorm) is None:
                return f"layer {i}'s post-attention norm is not an RMSNorm"
        elif type(mlp).__name__ != "NoMLP":
            return f"layer {i}'s MLP ({type(mlp).__name__}) has no gate/up/down projections"
    return None


def choose_engine(engine: str, model, seq_len: int, what: str, *, training: bool = False, lm_head: bool = False,
                  reason: str | None = None) -> tuple[str, str | None]:
    """``("kernels" | "hf", why the kernels cannot run it or None)`` for an ``engine`` of
    :data:`GRADIENT_ENGINES` (``reason``: the caller's own, checked first); asking for "kernels" where they
    cannot run is a BppError."""
    if engine not in GRADIENT_ENGINES:
        raise BppError(f"{what} engine must be one of {', '.join(GRADIENT_ENGINES)}, got {engine!r}")
    if engine == "hf":
        return "hf", None
    reason = reason or kernel_blocks_unsupported(model, seq_len, training, lm_head)
    if reason is None:
        return "kernels", None
    if engine == "kernels":
        raise BppError(f"{what} cannot run through bpp_kernels: {reason}; use engine 'auto' or 'hf'")
    return "hf", reason


def _detached(linear) -> torch.Tensor:
    return getattr(linear, "base_layer", linear).weight.detach()


def lora_weight(linear) -> torch.Tensor:
    """The weight a projection computes with: W + (alpha / rank)·B·A for a peft LoRA layer (its
    "default" adapter; differentiable in A and B), its frozen weight (detached) otherwise. A
    :func:`pack_block` ``weight``."""
    if hasattr(linear, "lora_A") and "default" in linear.lora_A:
        A, B = linear.lora_A["default"].weight, linear.lora_B["default"].weight
        return linear.base_layer.weight.detach() + (B @ A) * linear.scaling["default"]
    return _detached(linear)


def pack_block(layer, weight: Callable | None = None) -> dict:
    """One decoder layer's weights in bpp_kernels' layouts for :func:`kernel_block`: ``"attn"`` and
    ``"mlp"`` (None for a compacted layer with no attention / no MLP), ``"attn_bias"`` and
    ``"mlp_bias"`` (the o_proj / down_proj output biases, or the emptied block's constant; None
    without). ``weight(linear)`` gives the weight each projection uses (default: its weight, detached); a
    differentiable one (e.g. W + s·B·A) makes the packed weights differentiable in it. Biases and
    norms are taken detached."""
    import bpp_kernels as K

    weight = weight or _detached
    attn, mlp = layer.self_attn, layer.mlp
    out = {"attn": None, "mlp": None, "attn_bias": None, "mlp_bias": None}
    if hasattr(attn, "q_proj"):
        hd = attn.head_dim
        groups = getattr(attn.k_proj, "base_layer", attn.k_proj).out_features // hd
        w_qkv, w_o_t, b_qkv = K.pack_attention(weight(attn.q_proj), weight(attn.k_proj), weight(attn.v_proj),
                                               weight(attn.o_proj), groups, _bias(attn.q_proj), _bias(attn.k_proj),
                                               _bias(attn.v_proj))
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        norm = layer.input_layernorm
        out["attn"] = dict(norm=norm.weight.detach(), eps=norm_eps(norm), w_qkv=w_qkv, w_o_t=w_o_t, b_qkv=b_qkv,
                           groups=groups, scale=float(attn.scaling),
                           q_norm=None if q_norm is None else q_norm.weight.detach(),
                           k_norm=None if k_norm is None else k_norm.weight.detach(),
                           norm_eps=norm_eps(q_norm) if q_norm is not None else 1e-6)
    out["attn_bias"] = _bias(attn.o_proj) if hasattr(attn, "q_proj") else _bias(attn)
    if hasattr(mlp, "gate_proj"):
        w_gate_up, w_down_t = K.pack_swiglu(weight(mlp.gate_proj), weight(mlp.up_proj), weight(mlp.down_proj))
        norm = layer.post_attention_layernorm
        out["mlp"] = dict(norm=norm.weight.detach(), eps=norm_eps(norm), w_gate_up=w_gate_up, w_down_t=w_down_t,
                          channels=w_down_t.shape[0])
    out["mlp_bias"] = _bias(mlp.down_proj) if hasattr(mlp, "gate_proj") else _bias(mlp)
    return out


def all_kept(S: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """keep_idx, keep_count of S masks that keep all n units."""
    import bpp_kernels as K

    return K.mask_to_index(torch.ones(S, n, dtype=torch.bool, device=device))


def kernel_block(block: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, groups=None, channels=None,
                 group_scale: torch.Tensor | None = None, channel_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A decoder layer packed by :func:`pack_block` on ``x (S, B, T, d)`` under S masks: ``groups`` /
    ``channels`` are ``(keep_idx, keep_count)`` (default: every unit kept); ``group_scale (S, G)`` /
    ``channel_scale (S, m)`` optional per-unit scales in unit order (the o_proj / down_proj inputs
    of a unit multiplied by it, as :func:`bpp.methods.calibration.input_scales` does), read only for the kept units.
    cos/sin ``(T, hd)``. Returns the layer's output ``(S, B, T, d)``."""
    import bpp_kernels as K

    S = x.shape[0]
    attn, mlp = block["attn"], block["mlp"]
    if attn is not None:
        idx, cnt = groups if groups is not None else all_kept(S, attn["groups"], x.device)
        scale = None if group_scale is None else group_scale.to(x.dtype).gather(1, idx.long())
        y = K.rms_norm(x, attn["norm"], attn["eps"])
        q_norm, k_norm = attn["q_norm"], attn["k_norm"]
        if torch.is_grad_enabled() and (y.requires_grad or attn["w_qkv"].requires_grad):
            # the C++ attention backward (bpp_kernels 0.1.0) writes q/k-norm weight gradients even when
            # they are not wanted (a null-pointer crash): have them computed, and let them go unused
            q_norm, k_norm = (None if w is None else w.detach().requires_grad_() for w in (q_norm, k_norm))
        a = K.masked_attention(y, attn["w_qkv"], attn["w_o_t"], cos, sin, idx, cnt, check=False, b_qkv=attn["b_qkv"],
                               q_norm=q_norm, k_norm=k_norm, norm_eps=attn["norm_eps"], scale=attn["scale"],
                               unit_scale=scale)
        if block["attn_bias"] is not None:
            a = a + block["attn_bias"]
        if mlp is not None:
            y, x = K.add_rms_norm(a, x, mlp["norm"], mlp["eps"])
        else:
            x = x + a
    else:
        if block["attn_bias"] is not None:
            x = x + block["attn_bias"]
        if mlp is not None:
            y = K.rms_norm(x, mlp["norm"], mlp["eps"])
    if mlp is not None:
        idx, cnt = channels if channels is not None else all_kept(S, mlp["channels"], x.device)
        scale = None if channel_scale is None else channel_scale.to(x.dtype).gather(1, idx.long())
        x = x + K.masked_swiglu(y, mlp["w_gate_up"], mlp["w_down_t"], idx, cnt, unit_scale=scale, check=False)
    if block["mlp_bias"] is not None:
        x = x + block["mlp_bias"]
    return x


def kernel_lm_loss(model, input_ids: torch.Tensor, weight: Callable | None = None,
                   masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean next-token NLL of ``model`` (Llama family, as :func:`kernel_blocks_unsupported` allows)
    over ``input_ids (B, T)``, computed by bpp_kernels ops only: the blocks packed by
    :func:`pack_block` with ``weight`` (differentiable weights give their gradients), the final
    norm, and the LM head fused with the cross-entropy (no ``(B·T, vocab)`` logits, forward or
    backward). ``masks``: ``{"group": (L, G) bool, "channel": (L, m) bool}``, the units each layer
    keeps (the others are skipped and their weights get zero gradient), or None (every unit). A
    float32 scalar."""
    import bpp_kernels as K

    inner = model.model
    B, T = input_ids.shape
    with torch.no_grad():
        h = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(h, torch.arange(T, device=h.device)[None])
    x, cos, sin = h[None], cos[0], sin[0]
    kept = {} if masks is None else {f"{t}s": [K.mask_to_index(row[None]) for row in m.to(h.device)]
                                     for t, m in masks.items()}
    for i, layer in enumerate(inner.layers):
        x = kernel_block(pack_block(layer, weight), x, cos, sin, **{k: v[i] for k, v in kept.items()})
    x = K.rms_norm(x, inner.norm.weight.detach(), norm_eps(inner.norm))
    rows = x[0, :, :-1].reshape(B * (T - 1), -1)
    return K.linear_cross_entropy(rows, model.lm_head.weight.detach(), input_ids[:, 1:].reshape(-1)).mean()
