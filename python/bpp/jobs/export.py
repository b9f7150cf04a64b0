"""A compacted model folder → one GGUF file that llama.cpp loads and runs as is.

Per-layer sizes go to llama.cpp's ``deci`` architecture, whose head counts and MLP widths are
per-layer arrays (``deci.attention.head_count``, ``…head_count_kv``, ``deci.feed_forward_length``).
A folder whose layers all agree goes to the family's own architecture (``llama`` for Llama and
Mistral, ``qwen2``, ``qwen3``) when that architecture holds every tensor the folder has.

What llama.cpp's ``deci`` graph does, and what this module writes because of it:
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
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import BppError
from ..modelio import resolve_model_dir
from ..runs import clean_partials, model_folder_lock

DTYPES = ("f32", "f16", "bf16", "q8_0")
_Q8_BLOCK = 32
_F16_MAX = 65504.0
_STOCK_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_NEOX_ROPE = ("qwen2", "qwen3")  # llama.cpp archs whose rope rotates halves, as Hugging Face does

# Hugging Face pre-tokenizers (as tokenizer.json describes them) → llama.cpp's tokenizer.ggml.pre
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    (("ByteLevel", False, True),): "gpt-2",
    (("Digits", True), ("ByteLevel", False, True)): "smollm",
    (("Split", _LLAMA3_SPLIT, "Isolated", False), ("ByteLevel", False, False)): "llama-bpe",
    (("Split", _QWEN2_SPLIT, "Isolated", False), ("ByteLevel", False, False)): "qwen2",
}


@dataclass
class _Tensor:
    """One tensor of the GGUF file: its name, numpy-order shape, GGML type and how to make it."""
    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    make: Callable[[], torch.Tensor]  # float32, shape ``shape``


@dataclass
class _Layer:
    """One layer of the GGUF file, made from layer ``src`` of the folder."""
    src: int
    n_head: int  # query heads in the file (a dummy head counts)
    n_head_kv: int
    n_ff: int
    attn: str  # "real" | "dummy" (one all-zero head) | "none"
    mlp: str  # "real" | "dummy" (one all-zero channel)


@dataclass
class _Model:
    folder: Path
    config: dict
    family: str
    arch: str = ""
    layers: list[_Layer] = field(default_factory=list)
    hidden: int = 0
    head_dim: int = 0
    heads_per_group: int = 1


class _Weights:
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
        self._handles = {f: safe_open(str(folder / f), framework="pt") for f in files}
        self._where = weight_map or {k: files[0] for k in self._handles[files[0]].keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name).to(torch.float32)


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "f32",
                force: bool = False, progress: bool = True) -> Path:
    """Write the model folder ``model_dir`` (a bpp-compacted folder, per-layer sizes or stock, a
    ``bpp prune`` / ``bpp baseline`` run folder holding one in ``model/``, or a stock Llama /
    Mistral / Qwen2 / Qwen3 folder) as the GGUF file ``out`` for llama.cpp.
    Per-layer sizes are read from config.json's ``kv_heads_per_layer`` and
    ``intermediate_size_per_layer`` (model type the family's, or ``bpp_pruned_<family>``).

    ``dtype``: "f32", "f16", "bf16" or "q8_0" for the weight matrices (norms, biases and the
    all-zero stand-ins are always f32). q8_0 needs every matrix row width (its input size) to be a
    multiple of 32; otherwise it is refused (compact with ``--round-to 32``, or pick f16).
    The file is written beside ``out`` under a temporary name, synced and renamed, so a failure
    leaves nothing behind; an existing ``out`` is only replaced with ``force``. Returns ``out``."""
    import gguf

    if dtype not in DTYPES:
        raise BppError(f"unknown GGUF dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    folder, out = resolve_model_dir(model_dir), Path(out).expanduser()
    if out.is_dir():
        raise BppError(f"{out} is a folder; give the path of the .gguf file to write")
    if out.exists() and not force:
        raise BppError(f"{out} exists; pass --force to replace it")
    model = _read_model(folder)
    weights = _Weights(folder)
    _plan_layers(model, weights)
    tensors = _tensors(model, weights, dtype)
    _check_widths(tensors, dtype)
    vocab = _vocab(model, weights)

    out.parent.mkdir(parents=True, exist_ok=True)
    lock = model_folder_lock(out, "export").acquire()  # one export of `out` at a time
    tmp, writer = None, None
    try:
        clean_partials(out.parent, (out.name,))  # the temporary file a killed export of `out` left
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}-", suffix=".tmp", dir=out.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        writer = gguf.GGUFWriter(None, model.arch)
        _write_metadata(writer, model, dtype)
        vocab(writer)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t), raw_dtype=t.qtype)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = _progress(tensors, progress)
        for t in tensors:
            writer.write_tensor_data(_encode(t))
            bar.update(1)
        bar.close()
        writer.flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        if writer is not None:
            writer.close()
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        lock.release()
    return out


# ----------------------------------------------------------------------------- reading the folder

def _read_model(folder: Path) -> _Model:
    if not (folder / "config.json").is_file():
        raise BppError(f"{folder} has no config.json: give a model folder written by bpp compact "
                       "(or a stock Llama / Mistral / Qwen2 / Qwen3 folder)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise BppError(f"cannot read {folder / 'config.json'}: {e}") from None
    model_type = str(config.get("model_type"))
    family = model_type.removeprefix("bpp_pruned_")
    if family not in _STOCK_ARCH:
        raise BppError(f"{folder}: model type {model_type!r} has no GGUF export; bpp exports the families "
                       f"{', '.join(_STOCK_ARCH)} (stock or compacted by bpp)")
    if config.get("hidden_act", "silu") != "silu":
        raise BppError(f"{folder}: hidden_act {config['hidden_act']!r} is not SiLU; llama.cpp's graphs for "
                       f"{family} compute SiLU")
    if family in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        raise BppError(f"{folder}: use_sliding_window is on; llama.cpp's {family} graph attends to the whole "
                       "context, so the file would compute something else")
    rope = _rope_params(config)["rope_type"]
    if rope not in ("default", "linear", "llama3"):
        raise BppError(f"{folder}: rope type {rope!r} is not exported; bpp writes default, linear and llama3 "
                       "rope, which llama.cpp computes as transformers does")
    model = _Model(folder, config, family)
    model.hidden = int(config["hidden_size"])
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    model.head_dim = int(config.get("head_dim") or model.hidden // n_heads)
    model.heads_per_group = n_heads // n_kv
    return model


def _layer_sizes(model: _Model) -> list[tuple[int, int]]:
    """(KV groups, MLP channels) per layer of the folder."""
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
        return [(int(a), int(b)) for a, b in zip(kv, ff)]
    n_kv = int(c.get("num_key_value_heads") or c["num_attention_heads"])
    return [(n_kv, int(c["intermediate_size"]))] * n


def _plan_layers(model: _Model, weights: _Weights) -> None:
    """Choose the architecture and what each layer of the file holds (see the module docstring)."""
    sizes = _layer_sizes(model)
    p = "model.layers"
    biases = {"o": any(f"{p}.{i}.self_attn.o_proj.bias" in weights or f"{p}.{i}.self_attn.bias" in weights
                       for i in range(len(sizes))),
              "down": any(f"{p}.{i}.mlp.down_proj.bias" in weights or f"{p}.{i}.mlp.bias" in weights
                          for i in range(len(sizes))),
              "gate_up": any(f"{p}.{i}.mlp.{n}_proj.bias" in weights for i in range(len(sizes))
                             for n in ("gate", "up"))}
    uniform = len(set(sizes)) == 1 and min(sizes[0]) > 0
    r, hd, d = model.heads_per_group, model.head_dim, model.hidden
    stock = _STOCK_ARCH[model.family]
    if uniform and stock == "llama":
        model.arch = "llama"
    elif uniform and stock == "qwen2" and not any(biases.values()) and sizes[0][0] * r * hd == d:
        model.arch = "qwen2"  # its q / o shapes are (d, d): only when the heads still fill the width
    elif uniform and stock == "qwen3" and not any(biases.values()):
        model.arch = "qwen3"
    elif model.family == "qwen3":
        why = ("per-layer sizes" if not uniform else "output biases (bias compensation)")
        raise BppError(f"{model.folder}: a Qwen3 model with {why} has no GGUF form: llama.cpp's deci "
                       "architecture has no q/k norms and its qwen3 one takes neither per-layer sizes nor "
                       "output biases; compact with the same KV groups and channels in every layer and no "
                       "bias compensation, or run the folder in transformers (trust_remote_code=True)")
    else:
        model.arch = "deci"
    for i, (kv, ff) in enumerate(sizes):
        o_bias = f"{p}.{i}.self_attn.bias" in weights
        down_bias = f"{p}.{i}.mlp.bias" in weights
        if kv == 0 and ff == 0 and not (o_bias or down_bias):
            continue  # the identity: left out
        attn = "real" if kv > 0 else ("dummy" if o_bias or not model.layers else "none")
        mlp = "real" if ff > 0 else "dummy"
        n_head, n_head_kv = (kv * r, kv) if attn == "real" else ((1, 1) if attn == "dummy" else (0, 0))
        model.layers.append(_Layer(i, n_head, n_head_kv, ff if ff > 0 else 1, attn, mlp))
    if not model.layers:
        raise BppError(f"{model.folder}: every layer is empty: nothing to export")


def _tensors(model: _Model, w: _Weights, dtype: str) -> list[_Tensor]:
    """Every tensor of the file in writing order, each checked against the folder's shapes."""
    import gguf

    q = gguf.GGMLQuantizationType
    mat = {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[dtype]
    d, hd = model.hidden, model.head_dim
    permute = model.arch not in _NEOX_ROPE
    out: list[_Tensor] = []

    def need(name: str, shape: tuple[int, ...]) -> None:
        if name not in w:
            raise BppError(f"{model.folder} has no tensor {name}: not a complete model folder "
                           "(compacted by bpp, or stock)")
        if w.shape(name) != shape:
            raise BppError(f"{model.folder}: {name} has shape {w.shape(name)}, its config says {shape}")

    def real(gguf_name: str, src: str, shape: tuple[int, ...], rope_rows: bool = False) -> None:
        need(src, shape)
        make = (lambda: _rope_permute(w.get(src), hd)) if rope_rows and permute else (lambda: w.get(src))
        out.append(_Tensor(gguf_name, shape, mat if len(shape) == 2 else q.F32, make))

    def zeros(gguf_name: str, shape: tuple[int, ...], fill: float = 0.0) -> None:
        out.append(_Tensor(gguf_name, shape, q.F32, lambda: torch.full(shape, fill)))

    vocab = w.shape("model.embed_tokens.weight")[0] if "model.embed_tokens.weight" in w else 0
    real("token_embd.weight", "model.embed_tokens.weight", (vocab, d))
    real("output_norm.weight", "model.norm.weight", (d,))
    if not model.config.get("tie_word_embeddings", False):
        real("output.weight", "lm_head.weight", (vocab, d))
    freqs = _rope_freq_factors(model)
    if freqs is not None:
        out.append(_Tensor("rope_freqs.weight", tuple(freqs.shape), q.F32, lambda: freqs))
    for b, layer in enumerate(model.layers):
        src, blk = f"model.layers.{layer.src}", f"blk.{b}"
        if layer.attn == "real":
            nq, nkv = layer.n_head * hd, layer.n_head_kv * hd
            real(f"{blk}.attn_norm.weight", f"{src}.input_layernorm.weight", (d,))
            for name, rows in (("q", nq), ("k", nkv), ("v", nkv)):
                real(f"{blk}.attn_{name}.weight", f"{src}.self_attn.{name}_proj.weight", (rows, d), name != "v")
                if f"{src}.self_attn.{name}_proj.bias" in w:
                    real(f"{blk}.attn_{name}.bias", f"{src}.self_attn.{name}_proj.bias", (rows,), name != "v")
            real(f"{blk}.attn_output.weight", f"{src}.self_attn.o_proj.weight", (d, nq))
            if f"{src}.self_attn.o_proj.bias" in w:
                real(f"{blk}.attn_output.bias", f"{src}.self_attn.o_proj.bias", (d,))
            if model.arch == "qwen3":
                real(f"{blk}.attn_q_norm.weight", f"{src}.self_attn.q_norm.weight", (hd,))
                real(f"{blk}.attn_k_norm.weight", f"{src}.self_attn.k_norm.weight", (hd,))
        elif layer.attn == "dummy":  # one all-zero head: adds 0, or the o-bias constant
            zeros(f"{blk}.attn_norm.weight", (d,), 1.0)
            for name in ("q", "k", "v"):
                zeros(f"{blk}.attn_{name}.weight", (hd, d))
            zeros(f"{blk}.attn_output.weight", (d, hd))
            if f"{src}.self_attn.bias" in w:
                real(f"{blk}.attn_output.bias", f"{src}.self_attn.bias", (d,))
        if layer.mlp == "real":
            ff = layer.n_ff
            real(f"{blk}.ffn_norm.weight", f"{src}.post_attention_layernorm.weight", (d,))
            real(f"{blk}.ffn_gate.weight", f"{src}.mlp.gate_proj.weight", (ff, d))
            real(f"{blk}.ffn_up.weight", f"{src}.mlp.up_proj.weight", (ff, d))
            real(f"{blk}.ffn_down.weight", f"{src}.mlp.down_proj.weight", (d, ff))
            for name in ("gate", "up"):
                if f"{src}.mlp.{name}_proj.bias" in w:
                    real(f"{blk}.ffn_{name}.bias", f"{src}.mlp.{name}_proj.bias", (ff,))
            if f"{src}.mlp.down_proj.bias" in w:
                real(f"{blk}.ffn_down.bias", f"{src}.mlp.down_proj.bias", (d,))
        else:  # one all-zero channel: deci would skip the whole layer at n_ff == 0
            zeros(f"{blk}.ffn_norm.weight", (d,), 1.0)
            for name in ("gate", "up"):
                zeros(f"{blk}.ffn_{name}.weight", (1, d))
            zeros(f"{blk}.ffn_down.weight", (d, 1))
            if f"{src}.mlp.bias" in w:
                real(f"{blk}.ffn_down.bias", f"{src}.mlp.bias", (d,))
    return out


def _rope_permute(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of each head from Hugging Face's [first halves | second halves] rope layout to
    llama.cpp's interleaved pairs (row j of the first half next to row j of the second)."""
    rest = t.shape[1:]
    return t.reshape(-1, 2, head_dim // 2, *rest).transpose(1, 2).reshape(t.shape).contiguous()


def _rope_params(config: dict) -> dict:
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = str(params.get("rope_type") or params.get("type") or "default").lower()
    return params


def _rope_freq_factors(model: _Model) -> torch.Tensor | None:
    """Llama 3 rope scaling as llama.cpp holds it: per frequency, the divisor of the base frequency."""
    p = _rope_params(model.config)
    if p["rope_type"] != "llama3":
        return None
    hd = model.head_dim
    inv = 1.0 / (float(p["rope_theta"]) ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old = float(p["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old / low, inv / factor, (1 - smooth) * inv / factor + smooth * inv)
    scaled = torch.where(wavelen < old / high, inv, scaled)
    return (inv / scaled).to(torch.float32)


def _check_widths(tensors: list[_Tensor], dtype: str) -> None:
    if dtype != "q8_0":
        return
    bad = [t for t in tensors if len(t.shape) == 2 and t.qtype.name == "Q8_0" and t.shape[1] % _Q8_BLOCK]
    if bad:
        listed = ", ".join(f"{t.name} ({t.shape[1]})" for t in bad[:3]) + (", …" if len(bad) > 3 else "")
        raise BppError(f"q8_0 needs every matrix row width to be a multiple of {_Q8_BLOCK}; {len(bad)} are not: "
                       f"{listed}; compact with --round-to 32 (MLP widths), or export with --dtype f16")


# ----------------------------------------------------------------------------- writing

def _write_metadata(writer, model: _Model, dtype: str) -> None:
    import gguf

    c, layers = model.config, model.layers
    writer.add_name(str(c.get("_name_or_path") or model.folder.name) or model.folder.name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    context = int(c.get("max_position_embeddings") or 4096)
    if model.family == "mistral" and c.get("sliding_window"):
        # llama.cpp attends to the whole context; up to the window that is what Mistral computes
        context = min(context, int(c["sliding_window"]))
    writer.add_context_length(context)
    writer.add_embedding_length(model.hidden)
    writer.add_block_count(len(layers))
    if model.arch == "deci":
        writer.add_feed_forward_length([layer.n_ff for layer in layers])
        writer.add_head_count([layer.n_head for layer in layers])
        writer.add_head_count_kv([layer.n_head_kv for layer in layers])
    else:
        writer.add_feed_forward_length(layers[0].n_ff)
        writer.add_head_count(layers[0].n_head)
        writer.add_head_count_kv(layers[0].n_head_kv)
    writer.add_key_length(model.head_dim)
    writer.add_value_length(model.head_dim)
    writer.add_rope_dimension_count(model.head_dim)
    writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    rope = _rope_params(c)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _nbytes(t: _Tensor) -> int:
    n = math.prod(t.shape)
    name = t.qtype.name
    if name == "Q8_0":
        return n // _Q8_BLOCK * 34  # a block: one f16 scale and 32 int8
    return n * (4 if name == "F32" else 2)


def _encode(t: _Tensor) -> np.ndarray:
    from gguf.quants import quantize

    x = t.make()
    if tuple(x.shape) != t.shape:  # a bug here, not a user error
        raise RuntimeError(f"{t.name}: made shape {tuple(x.shape)}, planned {t.shape}")
    name = t.qtype.name
    if name == "F32":
        return x.contiguous().numpy()
    if name == "F16":
        if x.abs().max() > _F16_MAX:
            raise BppError(f"{t.name} has values beyond float16's range ({_F16_MAX:g}); export with --dtype bf16 or f32")
        return x.to(torch.float16).numpy()
    if name == "BF16":
        return x.to(torch.bfloat16).view(torch.int16).numpy()
    return quantize(x.contiguous().numpy(), t.qtype)


def _progress(tensors: list[_Tensor], enabled: bool):
    from tqdm import tqdm

    return tqdm(total=len(tensors), desc="GGUF", unit="tensor", disable=not enabled)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still done
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- tokenizer

def _describe_pre(pt: dict | None) -> tuple:
    """A comparable description of a tokenizer.json pre_tokenizer."""
    if pt is None:
        return ()
    kind = pt.get("type")
    if kind == "Sequence":
        return tuple(x for p in pt.get("pretokenizers", []) for x in _describe_pre(p))
    if kind == "ByteLevel":
        return (("ByteLevel", bool(pt.get("add_prefix_space", True)), bool(pt.get("use_regex", True))),)
    if kind == "Digits":
        return (("Digits", bool(pt.get("individual_digits", False))),)
    if kind == "Split":
        pattern = pt.get("pattern") or {}
        return (("Split", pattern.get("Regex", pattern.get("String")), pt.get("behavior"), bool(pt.get("invert"))),)
    return ((kind,),)


def _vocab(model: _Model, weights: _Weights) -> Callable:
    """Read and check the folder's tokenizer now; return the function that writes it to the file.

    Byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen2/3) becomes llama.cpp's "gpt2" tokenizer with the
    matching pre-tokenizer; byte-fallback BPE converted from SentencePiece (Llama 2, Mistral)
    becomes its "llama" tokenizer, each token scored by the rank of the merge that makes it."""
    import gguf

    path = model.folder / "tokenizer.json"
    if not path.is_file():
        raise BppError(f"{model.folder} has no tokenizer.json; llama.cpp needs the tokenizer in the file: save "
                       "the tokenizer into the folder (bpp compact does)")
    tok = json.loads(path.read_text(encoding="utf-8"))
    bpe = tok.get("model") or {}
    if bpe.get("type") != "BPE":
        raise BppError(f"{path}: a {bpe.get('type')} tokenizer is not exported; bpp writes BPE tokenizers "
                       "(GPT-2, SmolLM, Llama 2/3, Mistral, Qwen2/3)")
    n_vocab = weights.shape("model.embed_tokens.weight")[0]
    spm = bool(bpe.get("byte_fallback"))
    if spm:
        space_prefix = _sentencepiece_space_prefix(tok)
        if space_prefix is None:
            raise BppError(f"{path}: a byte-fallback BPE tokenizer whose normalizer / pre-tokenizer is not the "
                           "SentencePiece one ('▁' for spaces); llama.cpp has no equivalent bpp knows")
    else:
        pre = _PRE_TOKENIZERS.get(_describe_pre(tok.get("pre_tokenizer")))
        normalizer = (tok.get("normalizer") or {}).get("type")
        if pre is None or normalizer not in (None, "NFC" if pre == "qwen2" else None):
            raise BppError(f"{path}: its pre-tokenizer {_describe_pre(tok.get('pre_tokenizer'))} (normalizer "
                           f"{normalizer}) has no llama.cpp equivalent bpp knows; bpp writes the byte-level BPE "
                           "tokenizers of GPT-2, SmolLM, Llama 3 and Qwen2/3")
    tokens: list[str | None] = [None] * n_vocab
    types = [gguf.TokenType.UNUSED] * n_vocab
    unk = bpe.get("unk_token")
    for text, i in bpe.get("vocab", {}).items():
        if i >= n_vocab:
            raise BppError(f"{path}: token id {i} is beyond the embedding's {n_vocab} rows")
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in tok.get("added_tokens", []):
        i = int(added["id"])
        if i >= n_vocab:
            raise BppError(f"{path}: added token id {i} is beyond the embedding's {n_vocab} rows")
        tokens[i] = added["content"]
        types[i] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if spm:
        for i, text in enumerate(tokens):
            if text is not None and _BYTE_TOKEN.fullmatch(text):
                types[i] = gguf.TokenType.BYTE
            elif text is not None and text == unk:
                types[i] = gguf.TokenType.UNKNOWN
        scores = _merge_scores(bpe, n_vocab)
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    special = gguf.SpecialVocab(model.folder, load_merges=not spm, n_vocab=n_vocab)
    if not spm and not special.merges:
        raise BppError(f"{path} has no merges: not a BPE tokenizer llama.cpp can run")
    add_bos, add_eos = _adds_special_tokens(path, special.special_token_ids)
    special.add_special_token.update({"bos": add_bos, "eos": add_eos})

    def write(writer) -> None:
        writer.add_vocab_size(n_vocab)
        if spm:
            writer.add_tokenizer_model("llama")
            writer.add_add_space_prefix(space_prefix)
            writer.add_token_scores(scores)
        else:
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special.add_to_gguf(writer, quiet=True)

    return write


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _sentencepiece_space_prefix(tok: dict) -> bool | None:
    """For a tokenizer.json converted from SentencePiece (spaces become '▁'): whether it puts a '▁'
    before the text (llama.cpp's add_space_prefix); None when it is not of that shape."""
    norm, pre = tok.get("normalizer"), tok.get("pre_tokenizer")
    if norm is not None and pre is None:  # Prepend('▁') + Replace(' ', '▁')
        steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
        kinds = [(n.get("type"), n.get("prepend"), (n.get("pattern") or {}).get("String"), n.get("content"))
                 for n in steps]
        replace = ("Replace", None, " ", "\u2581")
        if kinds == [("Prepend", "\u2581", None, None), replace]:
            return True
        if kinds == [replace]:
            return False
        return None
    if norm is None and pre is not None and pre.get("type") == "Metaspace" and pre.get("replacement") == "\u2581":
        scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
        return {"first": True, "always": True, "never": False}.get(scheme)
    return None


def _merge_scores(bpe: dict, n_vocab: int) -> list[float]:
    """SentencePiece-style scores from BPE merges: a token made by the merge of rank r scores -r
    (llama.cpp merges the best-scored pair first, as BPE applies the lowest rank first); tokens no
    merge makes (characters, bytes, specials) score 0, which llama.cpp never compares."""
    vocab = bpe.get("vocab", {})
    scores = [0.0] * n_vocab
    seen = set()
    for rank, merge in enumerate(bpe.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        i = vocab.get(left + right)
        if i is not None and i not in seen:
            seen.add(i)
            scores[i] = -float(rank)
    return scores


def _adds_special_tokens(path: Path, ids: dict) -> tuple[bool, bool]:
    """Whether tokenizer.json's post-processor puts BOS before / EOS after a plain text (read with
    ``tokenizers`` directly: transformers' AutoTokenizer would consult the per-layer config)."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception types; the user needs the one line
        raise BppError(f"cannot read the tokenizer {path}: {e}") from None
    plain = tokenizer.encode("Hello world", add_special_tokens=False).ids
    full = tokenizer.encode("Hello world", add_special_tokens=True).ids
    add_bos = len(full) > len(plain) and full[0] == ids.get("bos") and plain[:1] != full[:1]
    add_eos = len(full) > len(plain) and full[-1] == ids.get("eos") and plain[-1:] != full[-1:]
    return add_bos, add_eos
