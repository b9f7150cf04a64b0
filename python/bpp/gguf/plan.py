"""The layer plan: a model folder's config and weights → the GGUF architecture and what each
layer of the file holds.

Per-layer sizes go to llama.cpp's ``deci`` architecture, whose head counts and MLP widths are
per-layer arrays (``deci.attention.head_count``, ``…head_count_kv``, ``deci.feed_forward_length``):
KV groups, query heads per group (bpp's query-head slots) and channels may all differ by layer.
A folder whose layers all agree goes to the family's own architecture (``llama`` for Llama and
Mistral, ``qwen2``, ``qwen3``) when that architecture holds every tensor the folder has. Gemma 3
goes to ``gemma3`` only (see :mod:`.gemma3`: its layers must agree).

What llama.cpp's ``deci`` graph does, and what the plan writes because of it:
- a layer with ``n_head == 0`` skips attention and its norm: an emptied attention block;
- a layer with ``n_ff == 0`` is skipped *whole*, attention output included: so a layer with
  attention but no MLP channels gets a one-channel all-zero MLP (it adds exactly zero, or the
  ``ffn_down.bias`` of bias compensation), and a layer with neither is left out;
- layer 0's head count sets the head size of every layer: an emptied layer-0 attention gets one
  all-zero head (it adds exactly zero);
- ``attn_output.bias`` is only added inside a real attention: the constant of an emptied,
  bias-compensated attention block goes to ``attn_output.bias`` of one all-zero head;
- its rope rotates adjacent pairs, so q/k rows (and biases) are permuted from Hugging Face's
  half-split layout; ``qwen2`` / ``qwen3`` rotate halves and take them unpermuted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BppError, first_line
from ..model_configs import check_config_sizes
from ..modelio import read_config
from . import gemma3

STOCK_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
NEOX_ROPE = ("qwen2", "qwen3", "gemma3")  # llama.cpp archs whose rope rotates halves, as Hugging Face does


@dataclass
class Layer:
    """One layer of the GGUF file, made from layer ``src`` of the folder."""
    src: int
    n_head: int  # query heads in the file (a dummy head counts)
    n_head_kv: int
    n_ff: int
    attn: str  # "real" | "dummy" (one all-zero head) | "none"
    mlp: str  # "real" | "dummy" (one all-zero channel)
    sliding: bool = False  # attends within a sliding window (Gemma 3)


@dataclass
class Model:
    """The folder's config, and the architecture and layers the plan chose for the file."""
    folder: Path
    config: dict
    family: str
    arch: str = ""
    layers: list[Layer] = field(default_factory=list)
    hidden: int = 0
    head_dim: int = 0
    heads_per_group: int = 1


class Weights:
    """Lazy reader of the folder's safetensors (one file or an index of shards)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (folder / "model.safetensors").is_file():
            files, weight_map = ["model.safetensors"], None
        else:
            raise BppError(f"{folder} has no model.safetensors (or index): save the model with safetensors first")
        try:
            self._handles = {f: safe_open(str(folder / f), framework="pt") for f in files}
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
            raise BppError(f"{folder}: a weight file is unreadable (truncated or corrupt: {first_line(e, 100)}); "
                           "copy or save the model again") from None
        self._where = weight_map or {k: files[0] for k in self._handles[files[0]].keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name).to(torch.float32)


def read_model(folder: Path) -> Model:
    """The folder's config.json, checked for what llama.cpp computes as transformers does."""
    if not (folder / "config.json").is_file():
        raise BppError(f"{folder} has no config.json: give a model folder written by bpp compact "
                       "(or a stock Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 folder)")
    config = read_config(folder)
    model_type = str(config.get("model_type"))
    family = model_type.removeprefix("bpp_pruned_")
    if family not in STOCK_ARCH:
        raise BppError(f"{folder}: model type {model_type!r} has no GGUF export; bpp exports the families "
                       f"{', '.join(STOCK_ARCH)} (stock or compacted by bpp)")
    check_config_sizes(config, folder)  # no negative, null or absurd counts, per layer too
    (gemma3.check_config if family == "gemma3_text" else _check_config)(config, folder)
    model = Model(folder, config, family)
    model.hidden = int(config["hidden_size"])
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    model.head_dim = int(config.get("head_dim") or model.hidden // n_heads)
    model.heads_per_group = n_heads // n_kv
    return model


def _check_config(config: dict, folder: Path) -> None:
    """Refuse a Llama / Mistral / Qwen config whose computation llama.cpp's graphs do not do."""
    family = str(config.get("model_type")).removeprefix("bpp_pruned_")
    if config.get("hidden_act", "silu") != "silu":
        raise BppError(f"{folder}: hidden_act {config['hidden_act']!r} is not SiLU; llama.cpp's graphs for "
                       f"{family} compute SiLU")
    if family in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        raise BppError(f"{folder}: use_sliding_window is on; llama.cpp's {family} graph attends to the whole "
                       "context, so the file would compute something else")
    rope = rope_params(config)["rope_type"]
    if rope not in ("default", "linear", "llama3"):
        raise BppError(f"{folder}: rope type {rope!r} is not exported; bpp writes default, linear and llama3 "
                       "rope, which llama.cpp computes as transformers does")


def rope_params(config: dict) -> dict:
    """The config's rope settings in one dict (``rope_scaling`` and ``rope_parameters`` merged),
    with ``rope_theta`` and a lower-case ``rope_type``."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = str(params.get("rope_type") or params.get("type") or "default").lower()
    return params


def layer_sizes(model: Model) -> list[tuple[int, int, int]]:
    """(KV groups, MLP channels, query heads per group) per layer of the folder."""
    c = model.config
    n = int(c["num_hidden_layers"])
    if "kv_heads_per_layer" in c or "intermediate_size_per_layer" in c:  # bpp's per-layer-size config
        if "kv_heads_per_layer" not in c or "intermediate_size_per_layer" not in c:
            raise BppError(f"{model.folder}/config.json has only one of kv_heads_per_layer and "
                           "intermediate_size_per_layer: not a folder bpp compacted")
        kv, ff = list(c["kv_heads_per_layer"]), list(c["intermediate_size_per_layer"])
        if len(kv) != n or len(ff) != n:
            raise BppError(f"{model.folder}/config.json: kv_heads_per_layer and intermediate_size_per_layer "
                           f"must hold {n} entries (num_hidden_layers)")
        slots = c.get("heads_per_group_per_layer") or [model.heads_per_group] * n
        if len(slots) != n:
            raise BppError(f"{model.folder}/config.json: heads_per_group_per_layer must hold {n} entries "
                           "(num_hidden_layers)")
        # a layer whose groups keep no query head has no attention, as the modeling file builds it
        return [(int(a) if h else 0, int(b), int(h) if a else 0) for a, b, h in zip(kv, ff, slots)]
    n_kv = int(c.get("num_key_value_heads") or c["num_attention_heads"])
    return [(n_kv, int(c["intermediate_size"]), model.heads_per_group)] * n


def plan_layers(model: Model, weights: Weights) -> None:
    """Choose the architecture and what each layer of the file holds (see the module docstring)."""
    sizes = layer_sizes(model)
    p = "model.layers"
    biases = {"o": any(f"{p}.{i}.self_attn.o_proj.bias" in weights or f"{p}.{i}.self_attn.bias" in weights
                       for i in range(len(sizes))),
              "down": any(f"{p}.{i}.mlp.down_proj.bias" in weights or f"{p}.{i}.mlp.bias" in weights
                          for i in range(len(sizes))),
              "gate_up": any(f"{p}.{i}.mlp.{n}_proj.bias" in weights for i in range(len(sizes))
                             for n in ("gate", "up"))}
    if model.family == "gemma3_text":
        qkv_bias = any(f"{p}.{i}.self_attn.{n}_proj.bias" in weights for i in range(len(sizes)) for n in "qkv")
        error = gemma3.refusal(model.folder, sizes, qkv_bias or any(biases.values()))
        if error is not None:
            raise error
        model.arch = gemma3.ARCH  # every layer as it is: one head count and MLP width for all
        kv, ff, r = sizes[0]
        sliding = gemma3.sliding_layers(model.config)
        model.layers = [Layer(i, kv * r, kv, ff, "real", "real", sliding[i])
                        for i in range(len(sizes))]
        return
    uniform = len(set(sizes)) == 1 and min(sizes[0]) > 0
    hd, d = model.head_dim, model.hidden
    stock = STOCK_ARCH[model.family]
    if uniform and stock == "llama":
        model.arch = "llama"
    elif uniform and stock == "qwen2" and not any(biases.values()) and sizes[0][0] * sizes[0][2] * hd == d:
        model.arch = "qwen2"  # its q / o shapes are (d, d): only when the heads still fill the width
    elif uniform and stock == "qwen3" and not any(biases.values()):
        model.arch = "qwen3"
    elif model.family == "qwen3":
        why = ("per-layer sizes" if not uniform else "output biases (bias compensation)")
        raise BppError(f"{model.folder}: a Qwen3 model with {why} has no GGUF form: llama.cpp's deci "
                       "architecture has no q/k norms and its qwen3 one takes neither per-layer sizes nor "
                       "output biases; compact with the same KV groups, query heads per group and channels in every "
                       "layer and no bias compensation, or run the folder in transformers (trust_remote_code=True)")
    else:
        model.arch = "deci"
    for i, (kv, ff, r) in enumerate(sizes):
        o_bias = f"{p}.{i}.self_attn.bias" in weights
        down_bias = f"{p}.{i}.mlp.bias" in weights
        if kv == 0 and ff == 0 and not (o_bias or down_bias):
            continue  # the identity: left out
        attn = "real" if kv > 0 else ("dummy" if o_bias or not model.layers else "none")
        mlp = "real" if ff > 0 else "dummy"
        n_head, n_head_kv = (kv * r, kv) if attn == "real" else ((1, 1) if attn == "dummy" else (0, 0))
        model.layers.append(Layer(i, n_head, n_head_kv, ff if ff > 0 else 1, attn, mlp))
    if not model.layers:
        raise BppError(f"{model.folder}: every layer is empty: nothing to export")
