"""Sets of structured masks (:class:`Masks`): S masks over a model's channels, KV groups and layers,
saved and loaded as safetensors with the fingerprint of the model they were made for."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from .errors import BppError, first_line
from .fileio import atomic_write
from .space import MaskSpace, fingerprint_difference, model_fingerprint


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

    def __eq__(self, other) -> bool:
        """Equal when every field has the same shape and values."""
        if not isinstance(other, Masks):
            return NotImplemented
        return all(torch.equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))

    __hash__ = None

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

        metadata = {"bpp_model": json.dumps(model)} if model is not None else None
        tensors = {f.name: getattr(self, f.name).contiguous().cpu() for f in fields(self)}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

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
        if masks.model is not None and not isinstance(masks.model, dict):
            raise BppError(f"{path} names the model it was made for in a form bpp does not write (not a JSON "
                           "object); write the mask again with bpp prune or bpp baseline")
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
