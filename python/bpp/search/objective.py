"""The objective: what a mask's loss is and what it is computed on. :class:`MaskLosses` evaluates
S masks on a batch of windows, with the bias compensation of the model that will be written
and against the text's tokens (``nll``) or the dense model's next-token distribution (``soft``);
the calibration text is cut into the gradient's batches and the incumbent's selection windows,
which never overlap."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..data import cut_windows
from ..errors import BppError
from ..masks import Masks
from .config import PruneConfig, eval_dtype

WINDOWS_PER_PASS = 4  # windows evaluated in one pass of per-window losses: bounds the activations

LossesFn = Callable[[torch.Tensor, Masks], torch.Tensor]


class MaskLosses:
    """Losses of masks on a batch: ``fn(ids, masks) -> (S,)`` and ``per_window(ids, masks) -> (S, B)``,
    with the bias compensation of :class:`bpp.bias_compensation.BiasCompensation` when given, against the
    text's tokens (``objective="nll"``) or the dense model's next-token distribution ("soft")."""

    def __init__(self, engine=None, compensation=None, custom=None, objective: str = "nll", teacher_cache: int = 2):
        self.engine, self.compensation, self.custom, self.objective = engine, compensation, custom, objective
        self.teacher_cache = max(int(teacher_cache), 1)
        self._teachers: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids, targets), most recent last

    def teacher(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The dense model's targets for ``ids``, computed once per batch; the last ``teacher_cache``
        batches are kept (the selection windows come back at every incumbent check)."""
        if self.objective != "soft":
            return None
        for i, (known, e) in enumerate(self._teachers):
            if known.shape == ids.shape and torch.equal(known, ids):
                self._teachers.append(self._teachers.pop(i))
                return e
        older = self._teachers[max(len(self._teachers) + 1 - self.teacher_cache, 0):]
        self._teachers = older + [(ids.clone(), self.engine.teacher(ids))]
        return self._teachers[-1][1]

    def __call__(self, ids: torch.Tensor, masks: Masks) -> torch.Tensor:
        if self.custom is not None:
            return self.custom(ids, masks)
        biases = None if self.compensation is None else self.compensation.biases(masks)
        return self.engine.losses(ids, masks, biases=biases, teacher=self.teacher(ids))

    def per_window(self, ids: torch.Tensor, masks: Masks) -> torch.Tensor:
        if self.custom is not None:
            return torch.stack([self.custom(ids[i:i + 1], masks) for i in range(ids.shape[0])], dim=1)
        biases = None if self.compensation is None else self.compensation.biases(masks)
        out = []
        for i in range(0, ids.shape[0], WINDOWS_PER_PASS):
            part = ids[i:i + WINDOWS_PER_PASS]
            out.append(self.engine.losses(part, masks, biases=biases, per_window=True, teacher=self.teacher(part)))
        return torch.cat(out, dim=1)


def _hook_losses_with_biases(model, ids: torch.Tensor, masks: Masks, compensation) -> torch.Tensor:
    """The ground truth with bias compensation: one Hugging Face forward per mask, the pruned
    inputs zeroed by hooks and each layer's compensation added to o_proj / down_proj's output."""
    from ..models.hooks import hook_masks

    attn, mlp = compensation.biases(masks)
    out = []
    for s in range(masks.S):
        handles = []
        for i, layer in enumerate(model.model.layers):
            for module, bias in ((layer.self_attn.o_proj, attn[i, s]), (layer.mlp.down_proj, mlp[i, s])):
                handles.append(module.register_forward_hook(lambda mod, args, output, b=bias: output + b))
        try:
            with hook_masks(model, masks[s]):
                logits = model(ids).logits[:, :-1].float()
        finally:
            for h in handles:
                h.remove()
        out.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))
    return torch.stack(out)


def mask_losses(model, config: PruneConfig, custom: LossesFn | None = None) -> tuple[MaskLosses, str]:
    """The run's mask losses and their name: ``custom``, the slow hook ground truth (one Hugging
    Face forward per mask, ``engine="hooks"``) or the batched engine ``MaskedModel``. The bias
    compensation is attached (``.compensation``) once it is calibrated."""
    if custom is not None:
        if config.objective != "nll":
            raise BppError("a custom losses_fn judges masks by its own loss; set objective='nll' (--objective nll)")
        if config.bias_compensation:
            raise BppError("a custom losses_fn is called without bias compensation; set bias_compensation=False "
                           "(--no-bias-compensation), or leave losses_fn out to use bpp's engines")
        return MaskLosses(custom=custom), getattr(custom, "__qualname__", "custom")
    if config.engine == "hooks":
        from ..models.hooks import hook_losses

        if config.objective != "nll":
            raise BppError("--engine hooks evaluates the next-token loss only; pass --objective nll with it")
        losses = MaskLosses()
        losses.custom = lambda ids, masks: (hook_losses(model, ids, masks) if losses.compensation is None
                                            else _hook_losses_with_biases(model, ids, masks, losses.compensation))
        return losses, "hook_losses"
    from ..models.masked import MaskedModel

    # the training batch and the selection windows, a pass of WINDOWS_PER_PASS at a time
    cache = 1 + math.ceil(config.selection_windows / WINDOWS_PER_PASS)
    dtype = eval_dtype(config, model.get_input_embeddings().weight.dtype)
    engine = MaskedModel(model, dtype=dtype)
    name = "MaskedModel" if dtype == engine.embed.dtype else f"MaskedModel in {str(dtype).removeprefix('torch.')}"
    return MaskLosses(engine=engine, objective=config.objective, teacher_cache=cache), name


def calibration_batches(ids: torch.Tensor, config: PruneConfig, bos: int | None = None) -> torch.Tensor:
    """The calibration token stream cut into non-overlapping windows of ``seq_len`` (each starting
    with ``bos`` when given, :func:`bpp.data.window_bos`), shuffled by the seed; step t uses rows
    [t·B, (t+1)·B). The windows the incumbent's selection holds back are never among them. A
    search longer than the text (``steps × batch_size`` windows) goes over it again, each further
    pass in a new order of the same windows."""
    windows = cut_windows(ids, config.seq_len, bos)
    n = windows.shape[0]
    need = config.steps * config.batch_size
    held = config.selection_windows if config.incumbent_every else 0
    pool = n - held
    if pool < config.batch_size:
        raise BppError(
            f"too little calibration text: {ids.numel()} tokens make {n} windows of {config.seq_len}, "
            f"{f'{held} of them held back for the incumbent, ' if held else ''}but one batch needs "
            f"{config.batch_size}; lower --batch-size or --seq-len, or give more text with --data")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    if need <= pool:
        return windows[order[:need]].clone()
    passes = [order[:pool]]
    generator = torch.Generator().manual_seed(config.seed + 1)
    while sum(p.numel() for p in passes) < need:
        passes.append(order[:pool][torch.randperm(pool, generator=generator)])
    return windows[torch.cat(passes)[:need]].clone()


def passes_over_text(ids: torch.Tensor, config: PruneConfig, bos: int | None = None) -> float:
    """How many times the search's batches go over the calibration windows they are drawn from."""
    held = config.selection_windows if config.incumbent_every else 0
    n = ids.numel() // (config.seq_len - (bos is not None)) - held
    return config.steps * config.batch_size / max(n, 1)


def selection_windows(ids: torch.Tensor, config: PruneConfig, bos: int | None = None) -> torch.Tensor | None:
    """The incumbent's held-in windows: the last ``selection_windows`` of the seeded shuffle whose
    first windows the gradient uses (so the two never overlap); ``bos`` as :func:`calibration_batches`."""
    if not config.incumbent_every:
        return None
    windows = cut_windows(ids, config.seq_len, bos)
    n = windows.shape[0]
    need = config.batch_size + config.selection_windows
    if n < need:
        raise BppError(f"too little calibration text: {n} windows of {config.seq_len} tokens, but one batch of "
                       f"{config.batch_size} and {config.selection_windows} selection windows need {need}; lower "
                       "--batch-size or --selection-windows, or give more text with --data")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    return windows[order[n - config.selection_windows:]].clone()
