"""The model a ``bpp prune`` run writes: how it makes up for the pruned units
(:class:`OutputCompensation`), the calibration windows it refits on (:func:`init_calibration`), and
``--init auto``'s start, chosen by the written model (:func:`choose_start`)."""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from ..data import window_bos
from ..reconstruction import DAMPING, reconstruct, residual_targets
from ..masks import Masks
from ..search import PruneConfig, config_budget, selection_windows


def init_calibration(config: PruneConfig, inputs: Inputs) -> torch.Tensor:
    """The run's calibration windows ``(init_windows, init_seq_len)`` (seeded): what the init method
    and the bias statistics calibrate on, and what the output's reconstruction refits on."""
    from ..data import windows as random_windows

    return random_windows(inputs.tokenizer, inputs.calib_ids, config.init_seq_len, config.init_windows,
                          seed=config.seed, bos=window_bos(inputs.model))


class OutputCompensation:
    """How the written model and the reported perplexities make up for the pruned units:
    ``reconstruct`` (o_proj/down_proj refit by damped least squares on :func:`init_calibration`'s
    windows, :func:`bpp.reconstruction.reconstruct`), ``bias`` (the FLAP biases the search judged
    masks with) or ``none``. The latest two refits are kept (``--init auto``'s two starts, then the
    chosen start's and the output's)."""

    def __init__(self, config: PruneConfig, inputs: Inputs, progress: bool):
        self.config, self.inputs, self.progress = config, inputs, progress
        self.seconds = 0.0
        self.errors: dict[str, dict] = {}  # mask name → Reconstruction.mean_errors()
        self._fits: list[tuple[Masks, dict, dict]] = []  # (mask, compact kwargs, mean errors), the latest two

    @property
    def kind(self) -> str:  # read when used: the search's bias compensation is set when the search starts
        if self.config.reconstruct:
            return "reconstruct"
        return "none" if self.inputs.losses.compensation is None else "bias"

    def kwargs(self, mask: Masks, name: str) -> dict:
        """What :func:`bpp.compaction.compact_model` takes besides ``mask`` to write ``mask``."""
        if self.kind == "bias":
            return self.inputs.losses.compensation.compact_biases(mask)
        if self.kind == "none":
            return {}
        for known, kwargs, errors in self._fits:
            if known == mask:
                self.errors[name] = errors
                return kwargs
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        calib = init_calibration(self.config, self.inputs)
        if self.progress:
            tqdm.write(f"reconstructing the {name.replace('_', ' ')}: o_proj/down_proj refit on "
                       f"{calib.shape[0]} x {calib.shape[1]} calibration tokens")
        with torch.no_grad():
            fit = reconstruct(self.inputs.model, mask, calib, damping=DAMPING, progress=self.progress)
        self.errors[name] = fit.mean_errors()
        self._fits = self._fits[-1:] + [(mask, fit.compact_kwargs(), self.errors[name])]
        self.seconds += time.perf_counter() - t0
        return self._fits[-1][1]

    def report(self) -> dict:
        if self.kind != "reconstruct":
            return {"compensation": self.kind}
        return {"compensation": self.kind, "reconstruction": {
            "damping": DAMPING, "residual_targets": residual_targets(self.inputs.model),
            "calib_windows": self.config.init_windows,
            "calib_seq_len": self.config.init_seq_len, "mean_relative_error": self.errors}}


def choose_start(config: PruneConfig, inputs: Inputs, calib: torch.Tensor | None, progress: bool = False,
                 written: "OutputCompensation | None" = None) -> tuple[str, tuple, dict | None]:
    """The init method the search starts from, its :func:`bpp.methods.initialise` result, and the
    record of the choice (None when ``--init`` names one method).

    For ``--init auto`` every candidate's mask is written as the run will write its output
    (:class:`OutputCompensation`: reconstructed by default) and judged on the incumbent's held-in
    windows by the incumbent's rule: the first candidate is kept unless another's mean per-window
    NLL is lower by more than ``z`` standard errors of the paired differences."""
    from ..evaluation import window_nll, written_model
    from ..methods import init_candidates, initialise
    from ..search.incumbent import Incumbent

    names = init_candidates(config.init)
    budget = config_budget(inputs.space, config)
    first = initialise(budget, names[0], inputs.model, calib)
    if len(names) == 1 or first[1] is None:  # (layer units: no init mask to write and judge)
        return names[0], first, None
    starts = {names[0]: first, **{name: initialise(budget, name, inputs.model, calib) for name in names[1:]}}
    ids = inputs.selection_ids
    if ids is None:  # a run without an incumbent: the windows it would have had
        ids = selection_windows(inputs.calib_ids, dataclasses.replace(config, incumbent_every=1),
                                window_bos(inputs.model))
    written = written or OutputCompensation(config, inputs, progress)
    losses = {}
    for name in names:
        mask = starts[name][1]
        with written_model(inputs.model, mask, written.kwargs(mask, f"{name}_start")) as model:
            losses[name] = window_nll(model, ids)
    judge, chosen, challenges = Incumbent(starts[names[0]][1], losses[names[0]]), names[0], []
    for name in names[1:]:
        record = judge.challenge(starts[name][1], losses[name], step=0)
        challenges.append({"candidate": name, **record})
        chosen = name if record["accepted"] else chosen
    ppl = {name: math.exp(float(v.mean())) for name, v in losses.items()}
    if progress:
        from tqdm.auto import tqdm

        listed = ", ".join(f"{name} {p:.3f}" for name, p in ppl.items())
        tqdm.write(f"--init auto: held-in perplexity of each start as written ({written.kind}): {listed}; "
                   f"starting from {chosen}'s mask")
    choice = {"candidates": list(names), "chosen": chosen, "compensation": written.kind, "windows": int(ids.shape[0]),
              "held_in_perplexity": ppl, "challenges": challenges, "z": judge.z}
    return chosen, starts[chosen], choice
