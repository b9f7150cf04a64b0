"""FLAP's bias compensation: the calibration means of the o_proj and down_proj inputs, and the
output biases they give a mask, so that a masked loss is the loss of the model
``bpp compact --bias-compensation`` writes.

For a mask, each layer gets ``b_o = W_o[:, pruned] @ mean(x_o)[pruned]`` and
``b_down = W_down[:, pruned] @ mean(x_down)[pruned]`` (x: the inputs of o_proj / down_proj over
the calibration tokens, dense model): what the pruned columns contributed on average. The biases
of S masks are formed at once, one ``(S, n) @ (n, d)`` product per layer in float64
(:func:`output_biases`); :func:`bpp.methods.flap.compensation_biases` is the S = 1 case of it.

A layer that a mask drops (``layers`` False) is removed by compaction, bias and all, so its
biases are zero here.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import BppError, first_line
from .fileio import atomic_write
from .masks import Masks
from .space import MaskSpace

FILE = "bias_compensation.safetensors"  # the calibration means a run's biases come from


class InputStats:
    """Running per-column mean and variance of the inputs of o_proj and down_proj (float64), over
    the calibration tokens of one pass of the whole model."""

    def __init__(self, model):
        self.model = model
        self.n = 0
        layers = model.model.layers
        self.sums = {k: [None] * len(layers) for k in ("attn", "mlp")}
        self.squares = {k: [None] * len(layers) for k in ("attn", "mlp")}

    def _hook(self, kind: str, layer: int):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            s, q = x.sum(0), x.pow(2).sum(0)
            if self.sums[kind][layer] is None:
                self.sums[kind][layer], self.squares[kind][layer] = s, q
            else:
                self.sums[kind][layer] += s
                self.squares[kind][layer] += q
            if kind == "mlp" and layer == 0:
                self.n += x.shape[0]
        return record

    @torch.no_grad()
    def collect(self, input_ids: torch.Tensor, batch_size: int = 8, progress: bool = False) -> "InputStats":
        from tqdm.auto import tqdm

        handles = []
        for i, layer in enumerate(self.model.model.layers):
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(self._hook("attn", i)))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._hook("mlp", i)))
        try:
            device = next(self.model.parameters()).device
            for start in tqdm(range(0, input_ids.shape[0], batch_size), desc="calibration statistics", unit="batch",
                              disable=not progress):
                self.model(input_ids[start:start + batch_size].to(device))
        finally:
            for h in handles:
                h.remove()
        return self

    def mean(self, kind: str) -> list[torch.Tensor]:
        return [s / self.n for s in self.sums[kind]]

    def variance(self, kind: str) -> list[torch.Tensor]:
        """Unbiased per-column variance over the calibration tokens."""
        n = self.n
        return [((q - s * s / n) / max(n - 1, 1)).clamp_min(0.0) for s, q in zip(self.sums[kind], self.squares[kind])]


def output_biases(space: MaskSpace, w_o: list[torch.Tensor], w_down: list[torch.Tensor],
                  attn_means: list[torch.Tensor], mlp_means: list[torch.Tensor],
                  masks: Masks) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAP's compensation biases of ``masks`` (S masks): ``(attn, mlp)``, each ``(L, S, d)``
    float64 on the CPU. ``w_o[l]`` ``(d, H·hd)`` and ``w_down[l]`` ``(d, m)`` are the layers'
    weights, ``attn_means[l]`` ``(H·hd,)`` and ``mlp_means[l]`` ``(m,)`` the calibration means
    of their inputs; a dropped layer gets zeros."""
    masks.validate(space)
    kept_heads = masks.kept_heads(space.heads_per_group).cpu().flatten(2)  # (S, L, G·r): groups and slots
    live = masks.layers.to(torch.float64).cpu()  # (S, L)
    attn, mlp = [], []
    for i in range(space.n_layers):
        pruned_cols = (~kept_heads[:, i]).repeat_interleave(space.head_dim, dim=1).to(torch.float64)
        pruned_ch = (~masks.channels[:, i].cpu()).to(torch.float64)
        w_o_i = w_o[i].detach().to(torch.float64).cpu()
        w_down_i = w_down[i].detach().to(torch.float64).cpu()
        attn_mean = attn_means[i].to(torch.float64).cpu()
        mlp_mean = mlp_means[i].to(torch.float64).cpu()
        attn.append(((pruned_cols * attn_mean) @ w_o_i.T) * live[:, i:i + 1])
        mlp.append(((pruned_ch * mlp_mean) @ w_down_i.T) * live[:, i:i + 1])
    return torch.stack(attn), torch.stack(mlp)


class BiasCompensation:
    """Per-layer calibration means of the o_proj and down_proj inputs, and the weights they
    multiply. ``attn_means[l]`` is ``(H·hd,)``, ``mlp_means[l]`` is ``(m,)``, float64."""

    def __init__(self, model, attn_means: list[torch.Tensor], mlp_means: list[torch.Tensor]):
        self.space = MaskSpace.from_model(model)
        L = self.space.n_layers
        if len(attn_means) != L or len(mlp_means) != L:
            raise BppError(f"bias compensation needs one mean vector per layer ({L}), got "
                           f"{len(attn_means)} and {len(mlp_means)}")
        sizes = {"attn": self.space.n_groups * self.space.heads_per_group * self.space.head_dim,
                 "mlp": self.space.n_channels}
        for kind, means in (("attn", attn_means), ("mlp", mlp_means)):
            for i, m in enumerate(means):
                if not torch.is_tensor(m) or tuple(m.shape) != (sizes[kind],):
                    raise BppError(f"the {kind} mean of layer {i} has shape {tuple(getattr(m, 'shape', ()))}, this "
                                   f"model needs ({sizes[kind]},)")
                if not torch.isfinite(m).all():
                    raise BppError(f"the {kind} mean of layer {i} holds NaN or infinite values")
        self.attn_means = [m.detach().to(torch.float64).cpu() for m in attn_means]
        self.mlp_means = [m.detach().to(torch.float64).cpu() for m in mlp_means]
        layers = model.model.layers
        self.w_o = [layer.self_attn.o_proj.weight.detach() for layer in layers]
        self.w_down = [layer.mlp.down_proj.weight.detach() for layer in layers]
        self.dtype = self.w_down[0].dtype

    @classmethod
    def from_stats(cls, model, stats: InputStats) -> "BiasCompensation":
        """From a collected :class:`InputStats`."""
        return cls(model, stats.mean("attn"), stats.mean("mlp"))

    @classmethod
    def collect(cls, model, input_ids: torch.Tensor) -> "BiasCompensation":
        return cls.from_stats(model, InputStats(model).collect(input_ids))

    # --- the biases ------------------------------------------------------------------------
    def biases(self, masks: Masks) -> tuple[torch.Tensor, torch.Tensor]:
        """``(attn, mlp)``, each ``(L, S, d)`` in the model's dtype, on the weights' device."""
        attn, mlp = output_biases(self.space, self.w_o, self.w_down, self.attn_means, self.mlp_means, masks)
        device = self.w_o[0].device
        return attn.to(device, self.dtype), mlp.to(device, self.dtype)

    def compact_biases(self, mask: Masks) -> dict:
        """``{"o_proj_bias": [...], "down_proj_bias": [...]}`` for :func:`bpp.compaction.compact_model`
        and ``save_compacted`` (S = 1)."""
        if mask.S != 1:
            raise BppError(f"compaction takes one mask (S = 1), got {mask.S}")
        attn, mlp = self.biases(mask)
        return {"o_proj_bias": list(attn[:, 0]), "down_proj_bias": list(mlp[:, 0])}

    # --- saving, so that `bpp compact` uses the very biases the run optimised -------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        tensors = {f"attn.{i}": m.contiguous() for i, m in enumerate(self.attn_means)}
        tensors.update({f"mlp.{i}": m.contiguous() for i, m in enumerate(self.mlp_means)})
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))

    @classmethod
    def load(cls, model, path: str | Path) -> "BiasCompensation":
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise BppError(f"bias compensation file {path} not found")
        try:
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
            raise BppError(f"{path} is not a readable bias compensation file ({first_line(e, 100)})") from None
        L = len(model.model.layers)
        try:
            return cls(model, [tensors[f"attn.{i}"] for i in range(L)], [tensors[f"mlp.{i}"] for i in range(L)])
        except KeyError:
            raise BppError(f"{path} does not hold calibration means for this model's {L} layers") from None
        except BppError as e:
            raise BppError(f"{path}: {e}; write it again with bpp prune --bias-compensation, or leave it out") from None

    def state(self) -> dict:
        return {"attn_means": [m.clone() for m in self.attn_means], "mlp_means": [m.clone() for m in self.mlp_means]}
