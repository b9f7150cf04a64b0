"""The prunable units of a model (:class:`MaskSpace`), their parameter costs, and the fingerprint
that identifies a model (masks are in :mod:`bpp.masks`).

Units per decoder layer: MLP intermediate channels (m of them), attention KV groups (G: one
key/value head with the r query heads that read it; for MHA a group is one head), and the
layer itself. Costs are parameter counts, so budgets can be stated in parameters.

Parameter accounting (compaction follows it exactly): a pruned channel removes its gate row,
up row and down column; a pruned group removes its q/k/v rows (and biases) and its o_proj
columns; a pruned query-head slot (:class:`bpp.masks.Masks` ``heads``: head j of every KV group
of a layer) removes, in each kept group, that head's q rows (and bias) and o_proj columns, while
the group's k/v rows stay; when every group, or every slot, of a layer is pruned, the attention
block disappears with its input norm and q/k norms; when every channel is pruned, the MLP disappears with its norm; a pruned
layer removes all of its parameters. Gemma 3's blocks own two norms each (before and after the
block), and go with both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BppError
from .modelio import check_supported


def block_norms(layer) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names of the norms a decoder layer's attention block owns, and its MLP block's."""
    if hasattr(layer, "post_feedforward_layernorm"):  # Gemma 3: one before and one after each block
        return ("input_layernorm", "post_attention_layernorm"), ("pre_feedforward_layernorm",
                                                                 "post_feedforward_layernorm")
    return ("input_layernorm",), ("post_attention_layernorm",)


@dataclass(frozen=True)
class MaskSpace:
    family: str
    n_layers: int
    hidden_size: int
    n_channels: int  # MLP intermediate size m
    n_groups: int  # KV heads G
    heads_per_group: int  # r = query heads / KV heads
    head_dim: int
    qkv_bias: bool
    qk_norm: bool
    total_params: int  # the whole model, tied weights once
    norms_per_block: int = 1  # RMSNorms of width d an attention / MLP block owns (Gemma 3: before and after it)

    @classmethod
    def from_model(cls, model) -> "MaskSpace":
        config = model.config
        check_supported(config)
        if getattr(config, "kv_heads_per_layer", None) is not None:
            raise BppError("this model has per-layer sizes (bpp compacted it); bpp prunes models whose layers "
                           "all have the same shape: prune the original model instead")
        if getattr(config, "mlp_bias", False):
            raise BppError("models with MLP biases (mlp_bias=True) are not supported yet")
        layer = model.model.layers[0]
        attn, mlp = layer.self_attn, layer.mlp
        G = config.num_key_value_heads
        H = config.num_attention_heads
        hd = attn.head_dim if hasattr(attn, "head_dim") else config.hidden_size // H
        if H % G:
            raise BppError(f"{H} attention heads do not split into {G} KV groups")
        return cls(
            family=config.model_type,
            n_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            n_channels=mlp.gate_proj.out_features,
            n_groups=G,
            heads_per_group=H // G,
            head_dim=hd,
            qkv_bias=attn.q_proj.bias is not None,
            qk_norm=hasattr(attn, "q_norm"),
            total_params=sum(p.numel() for p in model.parameters()),  # parameters() yields tied ones once
            norms_per_block=len(block_norms(layer)[0]),
        )

    # --- costs in parameters ---------------------------------------------------------------
    @property
    def channel_params(self) -> int:
        return 3 * self.hidden_size

    @property
    def group_params(self) -> int:
        rows = (self.heads_per_group + 2) * self.head_dim
        return rows * self.hidden_size + self.heads_per_group * self.head_dim * self.hidden_size + (
            rows if self.qkv_bias else 0)

    @property
    def head_params(self) -> int:
        """One query head of one group: its q rows (and bias) and its o_proj columns."""
        return 2 * self.head_dim * self.hidden_size + (self.head_dim if self.qkv_bias else 0)

    @property
    def kv_params(self) -> int:
        """One group's k and v rows (and biases): what a group costs beyond its query heads."""
        return self.group_params - self.heads_per_group * self.head_params

    def attention_params(self, groups: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Parameters of attention blocks keeping ``groups`` KV groups with ``heads`` query-head
        slots each (integer tensors of one shape): none when either is 0."""
        live = (groups > 0) & (heads > 0)
        return (groups * (self.kv_params + heads * self.head_params) + self.attention_fixed_params) * live

    @property
    def attention_fixed_params(self) -> int:
        """Parameters of an attention block that no group owns: its norm(s) and q/k norms."""
        return self.norms_per_block * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def mlp_fixed_params(self) -> int:
        return self.norms_per_block * self.hidden_size  # the norm before the MLP (Gemma 3: and after it)

    @property
    def layer_params(self) -> int:
        return (self.n_groups * self.group_params + self.attention_fixed_params
                + self.n_channels * self.channel_params + self.mlp_fixed_params)

    @property
    def prunable_params(self) -> int:
        """Parameters held by channels and groups over all layers (what width pruning can remove)."""
        return self.n_layers * (self.n_groups * self.group_params + self.n_channels * self.channel_params)

    def params(self, masks) -> torch.Tensor:
        """``(S,)`` int64: parameters left in the model after compacting each of ``masks`` (a
        :class:`bpp.masks.Masks`)."""
        masks.validate(self)
        ch = masks.channels.sum(-1)  # (S, L)
        gr = masks.groups.sum(-1)
        hd = masks.heads.sum(-1) if masks.heads is not None else torch.full_like(gr, self.heads_per_group)
        attn = self.attention_params(gr, hd)
        mlp = ch * self.channel_params + (ch > 0) * self.mlp_fixed_params
        layer = (attn + mlp) * masks.layers
        return self.total_params - self.n_layers * self.layer_params + layer.sum(-1)


# --- which model a mask belongs to -----------------------------------------------------------------

SAMPLES_PER_TENSOR = 64
# the share of a tensor's bf16 samples that may differ, and of all tensors' on average: loading in fp16
# rounds a bf16 tie the other way for about 1 sample in 13; 0.3% noise changes about 45%, another tensor all
MAX_CHANGED_SAMPLES, MAX_CHANGED_MEAN = 0.5, 0.2


def _weight_stats(t: torch.Tensor) -> list[float]:
    rows = t.detach().reshape(t.shape[0], -1)[:8].to(torch.float64)
    return [float(rows.abs().mean()), float(rows.norm())]


def _bf16_sample(t: torch.Tensor) -> str:
    """A strided sample of every part of ``t``, rounded to bf16 (so the same weights loaded in fp32,
    bf16 or fp16 give the same sample, up to fp16's double rounding), as hex."""
    flat = t.detach().reshape(-1)
    count = min(SAMPLES_PER_TENSOR, flat.numel())
    index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)  # exact in int64
    bits = flat[index].to(torch.float32).to(torch.bfloat16).view(torch.int16).cpu()
    return bits.numpy().astype(">i2").tobytes().hex()


@torch.no_grad()
def model_fingerprint(model) -> dict:
    """What identifies the model a mask was made for: its architecture and sizes, statistics of a
    few weights, and a strided bf16 sample of every weight tensor (robust to the dtype it was
    loaded in, not to other or perturbed weights)."""
    space = MaskSpace.from_model(model)
    layers = model.model.layers
    probes = [model.model.embed_tokens.weight, layers[0].self_attn.q_proj.weight,
              layers[len(layers) // 2].mlp.down_proj.weight, layers[-1].mlp.gate_proj.weight]
    return {"family": space.family, "layers": space.n_layers, "hidden": space.hidden_size,
            "channels": space.n_channels, "groups": space.n_groups, "heads_per_group": space.heads_per_group,
            "head_dim": space.head_dim, "vocab": int(model.config.vocab_size),
            "weights": [x for w in probes for x in _weight_stats(w)],
            "samples": {name: _bf16_sample(p) for name, p in model.named_parameters()}}


def _changed_samples(a: str, b: str) -> float:
    """The fraction of two hex bf16 samples' values that differ (1.0 when their lengths do)."""
    if not isinstance(a, str) or not isinstance(b, str) or len(a) != len(b) or not a:
        return 1.0
    x, y = bytes.fromhex(a), bytes.fromhex(b)
    return sum(x[i:i + 2] != y[i:i + 2] for i in range(0, len(x), 2)) / (len(x) // 2)


def _samples_difference(x, y) -> str | None:
    if not isinstance(x, dict) or not isinstance(y, dict):
        return "unreadable weight samples"
    if x.keys() != y.keys():
        return "other weight tensors"
    changed = {name: _changed_samples(x[name], y[name]) for name in x}
    worst = max(changed, key=changed.get, default=None)
    if worst is not None and changed[worst] > MAX_CHANGED_SAMPLES:
        return f"other weights in {worst}"
    if changed and sum(changed.values()) / len(changed) > MAX_CHANGED_MEAN:
        return "same shape, other weights"
    return None


def fingerprint_difference(a: dict, b: dict, rtol: float = 2e-2) -> str | None:
    """Why two fingerprints are of different models, or None when they match (fingerprints written
    before weight samples existed are compared on their statistics alone)."""
    for key in ("family", "layers", "hidden", "channels", "groups", "heads_per_group", "head_dim", "vocab"):
        if a.get(key) != b.get(key):
            return f"{key} {a.get(key)} vs {b.get(key)}"
    x, y = a.get("weights") or [], b.get("weights") or []
    if len(x) != len(y) or any(abs(p - q) > rtol * max(abs(p), abs(q), 1e-6) for p, q in zip(x, y)):
        return "same shape, other weights"
    if "samples" in a and "samples" in b:
        return _samples_difference(a["samples"], b["samples"])
    return None
