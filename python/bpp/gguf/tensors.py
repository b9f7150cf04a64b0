"""The file's tensors: which ones, in writing order, made from the folder's weights (rope rows
permuted, all-zero stand-ins), and their encoding as f32, f16, bf16 or q8_0."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import BppError
from . import gemma3
from .plan import NEOX_ROPE, Model, Weights, rope_params

Q8_BLOCK = 32
F16_MAX = 65504.0


@dataclass
class Tensor:
    """One tensor of the GGUF file: its name, numpy-order shape, GGML type and how to make it."""
    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    make: Callable[[], torch.Tensor]  # float32, shape ``shape``


def plan_tensors(model: Model, w: Weights, dtype: str) -> list[Tensor]:
    """Every tensor of the file in writing order, each checked against the folder's shapes."""
    import gguf

    q = gguf.GGMLQuantizationType
    mat = {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[dtype]
    d, hd = model.hidden, model.head_dim
    permute = model.arch not in NEOX_ROPE
    out: list[Tensor] = []

    def need(name: str, shape: tuple[int, ...]) -> None:
        if name not in w:
            raise BppError(f"{model.folder} has no tensor {name}: not a complete model folder "
                           "(compacted by bpp, or stock)")
        if w.shape(name) != shape:
            raise BppError(f"{model.folder}: {name} has shape {w.shape(name)}, its config says {shape}")

    def real(gguf_name: str, src: str, shape: tuple[int, ...], rope_rows: bool = False) -> None:
        need(src, shape)
        make = (lambda: rope_permute(w.get(src), hd)) if rope_rows and permute else (lambda: w.get(src))
        out.append(Tensor(gguf_name, shape, mat if len(shape) == 2 else q.F32, make))

    def zeros(gguf_name: str, shape: tuple[int, ...], fill: float = 0.0) -> None:
        out.append(Tensor(gguf_name, shape, q.F32, lambda: torch.full(shape, fill)))

    def norm(gguf_name: str, src: str, shape: tuple[int, ...], scale: float = 1.0) -> None:
        """A Gemma norm: Hugging Face scales by (1 + w), llama.cpp by the stored weight."""
        need(src, shape)
        out.append(Tensor(gguf_name, shape, q.F32, lambda: (1.0 + w.get(src)) * scale))

    vocab = w.shape("model.embed_tokens.weight")[0] if "model.embed_tokens.weight" in w else 0
    real("token_embd.weight", "model.embed_tokens.weight", (vocab, d))
    (norm if model.arch == "gemma3" else real)("output_norm.weight", "model.norm.weight", (d,))
    if not model.config.get("tie_word_embeddings", False):
        real("output.weight", "lm_head.weight", (vocab, d))
    freqs = rope_freq_factors(model)
    if freqs is not None:
        out.append(Tensor("rope_freqs.weight", tuple(freqs.shape), q.F32, lambda: freqs))
    for b, layer in enumerate(model.layers):
        src, blk = f"model.layers.{layer.src}", f"blk.{b}"
        if model.arch == "gemma3":
            gemma3.layer_tensors(blk, src, layer, model, real, norm)
            continue
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


def rope_permute(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of each head from Hugging Face's [first halves | second halves] rope layout to
    llama.cpp's interleaved pairs (row j of the first half next to row j of the second)."""
    rest = t.shape[1:]
    return t.reshape(-1, 2, head_dim // 2, *rest).transpose(1, 2).reshape(t.shape).contiguous()


def rope_freq_factors(model: Model) -> torch.Tensor | None:
    """Llama 3 rope scaling as llama.cpp holds it: per frequency, the divisor of the base frequency."""
    p = rope_params(model.config)
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


def check_widths(tensors: list[Tensor], dtype: str) -> None:
    """Refuse q8_0 when a matrix row width is not a multiple of its block."""
    if dtype != "q8_0":
        return
    bad = [t for t in tensors if len(t.shape) == 2 and t.qtype.name == "Q8_0" and t.shape[1] % Q8_BLOCK]
    if bad:
        listed = ", ".join(f"{t.name} ({t.shape[1]})" for t in bad[:3]) + (", …" if len(bad) > 3 else "")
        raise BppError(f"q8_0 needs every matrix row width to be a multiple of {Q8_BLOCK}; {len(bad)} are not: "
                       f"{listed}; compact with --round-to 32 (MLP widths), or export with --dtype f16")


def nbytes(t: Tensor) -> int:
    """The size of ``t`` in the file."""
    n = math.prod(t.shape)
    name = t.qtype.name
    if name == "Q8_0":
        return n // Q8_BLOCK * 34  # a block: one f16 scale and 32 int8
    return n * (4 if name == "F32" else 2)


def encode(t: Tensor) -> np.ndarray:
    """Make ``t`` and encode it in its GGML type, as the file's bytes hold it."""
    from gguf.quants import quantize

    x = t.make()
    if tuple(x.shape) != t.shape:  # a bug here, not a user error
        raise RuntimeError(f"{t.name}: made shape {tuple(x.shape)}, planned {t.shape}")
    name = t.qtype.name
    if name == "F32":
        return x.contiguous().numpy()
    if name == "F16":
        if x.abs().max() > F16_MAX:
            raise BppError(f"{t.name} has values beyond float16's range ({F16_MAX:g}); export with --dtype bf16 or f32")
        return x.to(torch.float16).numpy()
    if name == "BF16":
        return x.to(torch.bfloat16).view(torch.int16).numpy()
    return quantize(x.contiguous().numpy(), t.qtype)
