"""Gemma 3 text models (``gemma3_text``) as llama.cpp's ``gemma3`` architecture.

What llama.cpp's gemma3 graph computes, and what the file holds because of it:
- its RMSNorms scale by the stored weight, Hugging Face's Gemma norms by (1 + w): every norm
  (before and after each block, q/k, final) is written as 1 + w;
- the embedding scaled by sqrt(hidden), the tanh-GELU GeGLU MLP, q/k norms before rope, rope on
  halves (as Hugging Face: q/k rows unpermuted), no biases and no logit softcapping: as in
  transformers;
- queries are scaled by 1/sqrt(head_dim) (1/sqrt(hidden / heads) in a 62-layer file, which it
  takes for the 27B), Hugging Face's by query_pre_attn_scalar^-1/2: where the two differ, their
  ratio goes into the q norm's weights (the q norm comes before rope, which is linear);
- sliding-window layers use ``rope.freq_base_swa`` and full-attention layers ``rope.freq_base``;
  which layers slide is ``attention.sliding_window_pattern``, written per layer when it is not
  llama.cpp's default (every 6th layer full), e.g. after layers were dropped; it aborts the
  process on a file where no layer slides, so a model without sliding layers is written with
  every layer sliding in a window as long as the context, at the full layers' rope base;
- head counts and MLP widths are one number for all layers: per-layer arrays are read, but the
  tensors must have layer 0's shapes (llama-cpp-python 0.3.36 refuses such a file: "tensor
  'blk.1.ffn_gate.weight' has wrong shape"), and its projections take no biases. A folder whose
  layers differ in size, or that carries output biases (bias compensation), has no gemma3 form
  and is refused before anything is written.
"""
from __future__ import annotations

import math

from ..errors import BppError

ARCH = "gemma3"
DEFAULT_PERIOD = 6  # llama.cpp's gemma3 default: layer i slides unless i % 6 == 5 (as transformers')
GELU_TANH = ("gelu_pytorch_tanh",)  # llama.cpp's gemma3 MLP computes the tanh approximation of GELU
WHAT_WORKS = ("the compacted folder loads in transformers; Gemma 3 exports to GGUF dense or compacted with the "
              "same KV groups and MLP channels in every layer and no bias compensation")


def check_config(config: dict, folder) -> None:
    """Refuse a Gemma 3 config whose computation llama.cpp's gemma3 graph does not do."""
    act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in GELU_TANH:
        raise BppError(f"{folder}: hidden_activation {act!r} is not gelu_pytorch_tanh; llama.cpp's gemma3 graph "
                       "computes tanh-approximated GELU")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if config.get(key) is not None:
            raise BppError(f"{folder}: {key} is set; llama.cpp's gemma3 graph (with sliding windows) applies no "
                           "softcapping, so the file would compute something else")
    if config.get("use_bidirectional_attention"):
        raise BppError(f"{folder}: use_bidirectional_attention is on; llama.cpp's gemma3 graph is causal")
    for kind, params in rope(config).items():
        if params["rope_type"] != "default":
            raise BppError(f"{folder}: rope type {params['rope_type']!r} on the {kind} layers is not exported for "
                           "Gemma 3; bpp writes Gemma 3's default rope (the 270M and 1B models)")


def rope(config: dict) -> dict:
    """Rope settings of the full-attention and the sliding-window layers (``rope_theta``, a
    lower-case ``rope_type``), from transformers 5's per-layer-type ``rope_parameters`` or the
    older ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling``."""
    params = config.get("rope_parameters") or {}
    full = dict(params.get("full_attention") or {**(config.get("rope_scaling") or {}),
                                                 "rope_theta": config.get("rope_theta", 1_000_000.0)})
    sliding = dict(params.get("sliding_attention") or {"rope_theta": config.get("rope_local_base_freq", 10_000.0)})
    for p in (full, sliding):
        p["rope_type"] = str(p.get("rope_type") or p.get("type") or "default").lower()
    return {"full_attention": full, "sliding_attention": sliding}


def sliding_layers(config: dict) -> list[bool]:
    """Per layer of the folder: whether it attends within the sliding window."""
    n = int(config["num_hidden_layers"])
    kinds = config.get("layer_types")
    if kinds is None:  # transformers' default from the older integer pattern
        period = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or DEFAULT_PERIOD)
        kinds = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
    window = config.get("sliding_window")
    return [kind == "sliding_attention" and window is not None for kind in kinds]


def refusal(where, sizes: list[tuple[int, ...]], biased: bool) -> BppError | None:
    """Why a Gemma 3 model with these (KV groups, MLP channels[, query heads]) per layer, and output biases or
    not, has no gemma3 form (one line naming what exports); None when it has one."""
    if biased:
        return BppError(f"{where}: a Gemma 3 model with output biases (bias compensation) has no GGUF form: "
                        f"llama.cpp's gemma3 graph adds no bias to its projections; {WHAT_WORKS} "
                        "(bpp compact without --bias-compensation, bpp baseline --compensation none)")
    if len(set(sizes)) != 1 or min(sizes[0]) == 0:
        return BppError(f"{where}: a Gemma 3 model with per-layer sizes has no GGUF form: llama.cpp's gemma3 "
                        f"graph takes one head count and one MLP width for all layers; {WHAT_WORKS}")
    return None


def query_scale(model) -> float:
    """The factor that turns llama.cpp's query scale into the folder's: written into the q norm."""
    c, layers = model.config, model.layers
    if len(layers) == 62:  # llama.cpp takes a 62-layer gemma3 for the 27B and scales by its hidden / heads
        ours = 1.0 / math.sqrt(model.hidden / layers[0].n_head)
    else:
        ours = 1.0 / math.sqrt(model.head_dim)
    theirs = float(c.get("query_pre_attn_scalar") or model.head_dim) ** -0.5
    return theirs / ours


def layer_tensors(blk: str, src: str, layer, model, real, norm) -> None:
    """One layer's tensors: ``real(gguf name, folder name, shape)`` for matrices as they are,
    ``norm(gguf name, folder name, shape, scale)`` for norms written as (1 + w) · scale."""
    d, hd = model.hidden, model.head_dim
    nq, nkv = layer.n_head * hd, layer.n_head_kv * hd
    norm(f"{blk}.attn_norm.weight", f"{src}.input_layernorm.weight", (d,))
    real(f"{blk}.attn_q.weight", f"{src}.self_attn.q_proj.weight", (nq, d))
    real(f"{blk}.attn_k.weight", f"{src}.self_attn.k_proj.weight", (nkv, d))
    real(f"{blk}.attn_v.weight", f"{src}.self_attn.v_proj.weight", (nkv, d))
    norm(f"{blk}.attn_q_norm.weight", f"{src}.self_attn.q_norm.weight", (hd,), query_scale(model))
    norm(f"{blk}.attn_k_norm.weight", f"{src}.self_attn.k_norm.weight", (hd,))
    real(f"{blk}.attn_output.weight", f"{src}.self_attn.o_proj.weight", (d, nq))
    norm(f"{blk}.post_attention_norm.weight", f"{src}.post_attention_layernorm.weight", (d,))
    norm(f"{blk}.ffn_norm.weight", f"{src}.pre_feedforward_layernorm.weight", (d,))
    real(f"{blk}.ffn_gate.weight", f"{src}.mlp.gate_proj.weight", (layer.n_ff, d))
    real(f"{blk}.ffn_up.weight", f"{src}.mlp.up_proj.weight", (layer.n_ff, d))
    real(f"{blk}.ffn_down.weight", f"{src}.mlp.down_proj.weight", (d, layer.n_ff))
    norm(f"{blk}.post_ffw_norm.weight", f"{src}.post_feedforward_layernorm.weight", (d,))


def write_keys(writer, model, context: int) -> None:
    """The gemma3 keys beside the common ones: rope bases, the sliding window and which layers use
    it. ``context``: the file's context length."""
    c = model.config
    params = rope(c)
    full_base, sliding_base = (float(params[k]["rope_theta"]) for k in ("full_attention", "sliding_attention"))
    sliding = [layer.sliding for layer in model.layers]
    window = int(c.get("sliding_window") or 0)
    if not any(sliding):
        # llama.cpp's gemma3 asserts that some layer slides: a window as long as the context, with the
        # full layers' rope base, is full attention
        sliding, window, sliding_base = [True] * len(sliding), context, full_base
    writer.add_rope_freq_base(full_base)
    writer.add_rope_freq_base_swa(sliding_base)
    writer.add_sliding_window(window)
    if sliding != [i % DEFAULT_PERIOD < DEFAULT_PERIOD - 1 for i in range(len(sliding))]:
        writer.add_sliding_window_pattern(sliding)
