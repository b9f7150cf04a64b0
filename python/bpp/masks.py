"""Sets of structured masks (:class:`Masks`): S masks over a model's channels, KV groups, query-head
slots and layers, saved and loaded as safetensors with the fingerprint of the model they were made for."""
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
    """S structured masks: ``channels (S, L, m)``, ``groups (S, L, G)``, ``layers (S, L)`` and
    optionally ``heads (S, L, r)``, bool, True = kept. A layer that is not kept runs nothing,
    whatever its channels and groups say.

    ``heads`` are query-head slots: slot j of layer l is query head j of *every* KV group of that
    layer, so a layer keeps the same r' ≤ r query heads in each of its kept groups and stays a
    regular GQA attention (G'·r' query heads once compacted). None (the default, and every mask
    file written before slots existed) keeps every slot. A layer with no kept slot has no
    attention, like one with no kept group.

    The same container holds keep-probabilities θ (float, no S dimension) for :meth:`sample`.
    """

    channels: torch.Tensor
    groups: torch.Tensor
    layers: torch.Tensor
    heads: torch.Tensor | None = None

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
        heads = None if theta.heads is None else draw(theta.heads)
        return cls(draw(theta.channels), draw(theta.groups), draw(theta.layers), heads)

    def __eq__(self, other) -> bool:
        """Equal when every field has the same shape and values (no ``heads`` equals all slots kept)."""
        if not isinstance(other, Masks):
            return NotImplemented
        if not all(torch.equal(getattr(self, n), getattr(other, n)) for n in ("channels", "groups", "layers")):
            return False
        if self.heads is None or other.heads is None:
            given = self.heads if other.heads is None else other.heads
            return given is None or bool(given.all())
        return torch.equal(self.heads, other.heads)

    __hash__ = None

    @property
    def S(self) -> int:
        return self.layers.shape[0]

    def validate(self, space: MaskSpace) -> "Masks":
        S = self.layers.shape[0] if self.layers.dim() == 2 else None
        L, m, G, r = space.n_layers, space.n_channels, space.n_groups, space.heads_per_group
        expected = {"channels": (S, L, m), "groups": (S, L, G), "layers": (S, L)}
        if self.heads is not None:
            expected["heads"] = (S, L, r)
        for name, shape in expected.items():
            t = getattr(self, name)
            if not torch.is_tensor(t) or t.dtype != torch.bool:
                raise BppError(f"masks.{name} must be a bool tensor of shape (S, {', '.join(map(str, shape[1:]))})")
            if tuple(t.shape) != shape:
                raise BppError(f"masks.{name} has shape {tuple(t.shape)}, but this model needs "
                               f"{shape} (S={S}, {L} layers, {m} channels, {G} KV groups, {r} query heads per group)")
        return self

    def to(self, device) -> "Masks":
        return Masks(*(None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                       for f in fields(self)))

    def __getitem__(self, index) -> "Masks":
        """Masks of the samples selected by ``index`` (an int keeps the S dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Masks(self.channels[index], self.groups[index], self.layers[index],
                     None if self.heads is None else self.heads[index])

    @staticmethod
    def cat(items: list["Masks"]) -> "Masks":
        """The samples of ``items`` in order (slots of items without ``heads``: all kept)."""
        def part(name):
            return torch.cat([getattr(m, name) for m in items])

        r = next((m.heads.shape[-1] for m in items if m.heads is not None), None)
        heads = None if r is None else torch.cat([
            m.heads if m.heads is not None else torch.ones(*m.layers.shape, r, dtype=torch.bool, device=m.layers.device)
            for m in items])
        return Masks(part("channels"), part("groups"), part("layers"), heads)

    def kept_heads(self, heads_per_group: int) -> torch.Tensor:
        """``(S, L, G, r)`` bool: query head j of KV group g is computed (its group and its slot kept;
        dropped layers are not masked here, see :meth:`effective`)."""
        heads = self.heads if self.heads is not None else torch.ones(
            *self.layers.shape, heads_per_group, dtype=torch.bool, device=self.layers.device)
        return self.groups.unsqueeze(-1) & heads.unsqueeze(-2)

    def effective(self) -> "Masks":
        """Channels and groups of dropped layers marked pruned, and the groups of a layer that keeps
        no query-head slot (what is really computed)."""
        keep = self.layers.unsqueeze(-1)
        groups = self.groups & keep
        if self.heads is not None:
            groups = groups & self.heads.any(-1, keepdim=True)
        return replace(self, channels=self.channels & keep, groups=groups)

    def save(self, path: str | Path, model: dict | None = None) -> None:
        """Write the masks as safetensors; ``model``: the :func:`model_fingerprint` of the model they
        were made for, stored in the file's metadata so that another model is refused later."""
        from safetensors.torch import save_file

        metadata = {"bpp_model": json.dumps(model)} if model is not None else None
        tensors = {f.name: getattr(self, f.name).contiguous().cpu() for f in fields(self)
                   if getattr(self, f.name) is not None}
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
        missing = [f.name for f in fields(cls) if f.name not in tensors and f.name != "heads"]
        if missing:
            raise BppError(f"{path} is not a bpp mask file (missing {', '.join(missing)})")
        masks = cls(*(tensors.get(f.name) for f in fields(cls)))  # no heads (files before slots): all kept
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
