"""The prunable units of a model (MaskSpace) and sets of sampled structured masks (Masks).

Units per decoder layer: MLP intermediate channels (m of them), attention KV groups (G: one
key/value head with the r query heads that read it; for MHA a group is one head), and the
layer itself. Costs are parameter counts, so budgets can be stated in parameters.

Parameter accounting (compaction follows it exactly): a pruned channel removes its gate row,
up row and down column; a pruned group removes its q/k/v rows (and biases) and its o_proj
columns; when every group of a layer is pruned, the attention block disappears with its input
norm and q/k norms; when every channel is pruned, the MLP disappears with its norm; a pruned
layer removes all of its parameters.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from .errors import BppError, first_line
from .modelio import check_supported


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
    def attention_fixed_params(self) -> int:
        """Parameters of an attention block that no group owns: its input norm and q/k norms."""
        return self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def mlp_fixed_params(self) -> int:
        return self.hidden_size  # post-attention norm

    @property
    def layer_params(self) -> int:
        return (self.n_groups * self.group_params + self.attention_fixed_params
                + self.n_channels * self.channel_params + self.mlp_fixed_params)

    @property
    def prunable_params(self) -> int:
        """Parameters held by channels and groups over all layers (what width pruning can remove)."""
        return self.n_layers * (self.n_groups * self.group_params + self.n_channels * self.channel_params)

    def params(self, masks: "Masks") -> torch.Tensor:
        """``(S,)`` int64: parameters left in the model after compacting each mask."""
        masks.validate(self)
        ch = masks.channels.sum(-1)  # (S, L)
        gr = masks.groups.sum(-1)
        attn = gr * self.group_params + (gr > 0) * self.attention_fixed_params
        mlp = ch * self.channel_params + (ch > 0) * self.mlp_fixed_params
        layer = (attn + mlp) * masks.layers
        return self.total_params - self.n_layers * self.layer_params + layer.sum(-1)


@dataclass
class Masks:
    """S structured masks: ``channels (S, L, m)``, ``groups (S, L, G)``, ``layers (S, L)``, bool,
    True = kept. A layer that is not kept runs nothing, whatever its channels and groups say.

    The same container holds keep-probabilities θ (float, no S dimension) for :meth:`sample`.
    """

    channels: torch.Tensor
    groups: torch.Tensor
    layers: torch.Tensor

    @classmethod
    def full(cls, space: MaskSpace, S: int = 1, device=None) -> "Masks":
        L = space.n_layers
        ones = lambda *shape: torch.ones(*shape, dtype=torch.bool, device=device)  # noqa: E731
        return cls(ones(S, L, space.n_channels), ones(S, L, space.n_groups), ones(S, L))

    @classmethod
    def probabilities(cls, space: MaskSpace, keep: float = 1.0, device=None) -> "Masks":
        """θ with every unit at ``keep`` (shapes without S)."""
        L = space.n_layers
        fill = lambda *shape: torch.full(shape, float(keep), device=device)  # noqa: E731
        return cls(fill(L, space.n_channels), fill(L, space.n_groups), fill(L))

    @classmethod
    def sample(cls, theta: "Masks", S: int, generator: torch.Generator | None = None) -> "Masks":
        """S masks with every unit kept independently with probability θ_u."""
        draw = lambda p: torch.rand((S, *p.shape), generator=generator, device=p.device) < p  # noqa: E731
        return cls(draw(theta.channels), draw(theta.groups), draw(theta.layers))

    @property
    def S(self) -> int:
        return self.layers.shape[0]

    def validate(self, space: MaskSpace) -> "Masks":
        S = self.layers.shape[0] if self.layers.dim() == 2 else None
        L, m, G = space.n_layers, space.n_channels, space.n_groups
        expected = {"channels": (S, L, m), "groups": (S, L, G), "layers": (S, L)}
        for name, shape in expected.items():
            t = getattr(self, name)
            if not torch.is_tensor(t) or t.dtype != torch.bool:
                raise BppError(f"masks.{name} must be a bool tensor of shape (S, {', '.join(map(str, shape[1:]))})")
            if tuple(t.shape) != shape:
                raise BppError(f"masks.{name} has shape {tuple(t.shape)}, but this model needs "
                               f"{shape} (S={S}, {L} layers, {m} channels, {G} KV groups)")
        return self

    def to(self, device) -> "Masks":
        return Masks(*(getattr(self, f.name).to(device) for f in fields(self)))

    def __getitem__(self, index) -> "Masks":
        """Masks of the samples selected by ``index`` (an int keeps the S dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Masks(self.channels[index], self.groups[index], self.layers[index])

    @staticmethod
    def cat(items: list["Masks"]) -> "Masks":
        return Masks(*(torch.cat([getattr(m, f.name) for m in items]) for f in fields(Masks)))

    def effective(self) -> "Masks":
        """Channels and groups of dropped layers marked pruned (what is really computed)."""
        keep = self.layers.unsqueeze(-1)
        return replace(self, channels=self.channels & keep, groups=self.groups & keep)

    def save(self, path: str | Path, model: dict | None = None) -> None:
        """Write the masks as safetensors; ``model``: the :func:`model_fingerprint` of the model they
        were made for, stored in the file's metadata so that another model is refused later."""
        from safetensors.torch import save_file

        from .runs import io_errors

        metadata = {"bpp_model": json.dumps(model)} if model is not None else None
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.unlink(missing_ok=True)  # a symlink planted under the temporary name is not followed
            with io_errors(path):  # a full disk: OSError, not SafetensorError
                save_file({f.name: getattr(self, f.name).contiguous().cpu() for f in fields(self)}, str(tmp),
                          metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> "Masks":
        """Masks written by :meth:`save`; ``masks.model`` is the fingerprint of the model they were
        made for (None when the file does not say)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise BppError(f"mask file {path} not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
            raise BppError(f"{path} is not a readable mask file (truncated or corrupt: "
                           f"{first_line(e, 100)}); write it again with bpp prune or bpp baseline") from None
        missing = [f.name for f in fields(cls) if f.name not in tensors]
        if missing:
            raise BppError(f"{path} is not a bpp mask file (missing {', '.join(missing)})")
        masks = cls(*(tensors[f.name] for f in fields(cls)))
        try:
            masks.model = json.loads(metadata["bpp_model"]) if "bpp_model" in metadata else None
        except ValueError:
            masks.model = None
        return masks

    def check_model(self, model, what: str = "the mask") -> None:
        """Refuse ``model`` when these masks say they were made for another model."""
        made_for = getattr(self, "model", None)
        if made_for is None:
            return
        reason = fingerprint_difference(made_for, model_fingerprint(model))
        if reason:
            raise BppError(f"{what} was made for another model ({reason}); give the model it was made for, or "
                           "pass --allow-other-model if this one really is it")


# --- which model a mask belongs to -----------------------------------------------------------------

def _weight_stats(t: torch.Tensor) -> list[float]:
    rows = t.detach().reshape(t.shape[0], -1)[:8].to(torch.float64)
    return [float(rows.abs().mean()), float(rows.norm())]


@torch.no_grad()
def model_fingerprint(model) -> dict:
    """What identifies the model a mask was made for: its architecture and sizes, and statistics
    of a few weights (robust to the dtype it was loaded in, not to other weights)."""
    space = MaskSpace.from_model(model)
    layers = model.model.layers
    probes = [model.model.embed_tokens.weight, layers[0].self_attn.q_proj.weight,
              layers[len(layers) // 2].mlp.down_proj.weight, layers[-1].mlp.gate_proj.weight]
    return {"family": space.family, "layers": space.n_layers, "hidden": space.hidden_size,
            "channels": space.n_channels, "groups": space.n_groups, "heads_per_group": space.heads_per_group,
            "head_dim": space.head_dim, "vocab": int(model.config.vocab_size),
            "weights": [x for w in probes for x in _weight_stats(w)]}


def fingerprint_difference(a: dict, b: dict, rtol: float = 2e-2) -> str | None:
    """Why two fingerprints are of different models, or None when they match."""
    for key in ("family", "layers", "hidden", "channels", "groups", "heads_per_group", "head_dim", "vocab"):
        if a.get(key) != b.get(key):
            return f"{key} {a.get(key)} vs {b.get(key)}"
    x, y = a.get("weights") or [], b.get("weights") or []
    if len(x) != len(y) or any(abs(p - q) > rtol * max(abs(p), abs(q), 1e-6) for p, q in zip(x, y)):
        return "same shape, other weights"
    return None
