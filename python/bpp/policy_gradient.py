"""The policy-gradient loop: the configuration of a run, the calibration batches, how mask losses
are computed (bias compensation, soft targets), the steps, the incumbent, and the state that
makes a run resumable (the ``bpp prune`` job around it: :mod:`bpp.jobs.prune`). This is the
per-unit policy (``--policy units``, the official method); the allocation policy's loop
(``--policy allocation``, the default) builds on it in :mod:`bpp.allocation_loop`.

One step: draw S masks from the policy, evaluate their losses on one calibration batch (the
same batch for all S), drop masks whose loss is not finite, form the baseline, take a plain
gradient step on θ with the scheduled learning rate and project θ back onto the budget.

State that makes a run resumable bit for bit (written atomically every ``checkpoint_every``
steps, and at step 0): θ, the moving baseline, the step (which is also the data cursor and the
schedule position: batches are consecutive slices of a seeded shuffle, and the learning rate is
a function of the step), the mask-sampling generator, the global torch/Python/NumPy RNG states,
the counters and timings, the incumbent. The optimiser is the official plain step θ ← θ − lr·ĝ,
which has no state of its own.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import BppError
from .incumbent import Incumbent
from .modelio import check_device
from .policy import BASELINES, Policy, check_sparsity, loss_baseline, parse_granularity
from .runs import CHECKPOINT, differences, fingerprint, rng_state, save_checkpoint, set_rng_state
from .space import Masks

SCHEDULES = ("cosine", "constant")
ENGINES = ("batched", "hooks")  # how mask losses are computed: bpp.MaskedModel, or the hook ground truth
POLICIES = ("allocation", "units")
RANKS = ("init", "flap", "wanda-sp")
OBJECTIVES = ("soft", "nll")
OPTIMIZERS = ("adam", "sgd")
SAMPLINGS = ("antithetic", "independent")
UNITS_DEFAULTS = {"lr": 6e-3, "init": "wanda-sp", "budget": "count", "objective": "nll", "steps": 100}  # the official settings
# the allocation policy's: Adam on the offsets' smooth coefficients, BESA's start, one budget, soft targets;
# 60 steps: the incumbent stopped changing by step 30 in the measured runs, and BESA's init must fit too
ALLOCATION_DEFAULTS = {"lr": 0.02, "init": "besa", "budget": "params", "objective": "soft", "steps": 60}
TEACHER_CACHE = 6  # dense targets kept: a training batch and the selection windows in chunks of 4

LossesFn = Callable[[torch.Tensor, Masks], torch.Tensor]


@dataclass
class PruneConfig:
    """Everything that determines the result of a run (a resumed run must match it)."""

    model: str = "default"
    data: str = "default"
    sparsity: float = 0.2
    granularity: str = "channel,group"
    budget: str | None = None  # None: per policy (units: "count", the official; allocation: "params")
    steps: int | None = None  # None: per policy (units 100, allocation 60), sized so the default job fits a CPU budget
    samples: int = 8
    batch_size: int = 2
    seq_len: int = 128
    lr: float | None = None  # None: per policy (UNITS_DEFAULTS, ALLOCATION_DEFAULTS)
    schedule: str = "cosine"
    baseline: str = "moving-average"
    baseline_momentum: float = 0.8  # the official moving average over a window of 5: 1 − 1/5
    init: str | None = None  # None: per policy (units: wanda-sp, the official; allocation: besa)
    init_windows: int = 32
    init_seq_len: int = 256
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    device_map: str | None = None  # e.g. "auto": layers over the GPUs of a node, for models too large for one
    engine: str = "batched"
    # issue 18: the policy, masks judged as compacted, and the incumbent (bpp.allocation_loop)
    policy: str = "allocation"  # allocation (per-layer counts over a metric's ranking) | units (official)
    bias_compensation: bool = True  # masks judged, and the model written, with FLAP's output biases
    rank: str = "flap"  # allocation: what ranks units inside a layer: flap (fluctuation, fits bias compensation) | init | wanda-sp
    sigma: float = 0.05  # allocation: perturbation scale, a fraction of a layer's channels
    group_every: int = 4  # allocation: every N-th step explores KV-group moves (0: groups stay as the init's)
    incumbent_every: int = 10  # challenge the incumbent every N steps and at the end (0: no incumbent)
    selection_windows: int = 16  # held-in windows the incumbent is judged on (never used by the gradient)
    objective: str | None = None  # None: per policy (units: nll, official; allocation: soft, the dense model's distribution)
    basis: int = 8  # allocation: channel offsets as this many smooth profiles over depth (0: one per layer)
    optimizer: str = "adam"  # allocation: adam (per-coordinate steps) | sgd (normalised gradient steps)
    sampling: str = "antithetic"  # allocation: antithetic pairs | independent draws with a leave-one-out baseline

    def validate(self) -> "PruneConfig":
        resolve_policy_defaults(self)
        check_sparsity(self.sparsity)
        check_device(self.device)
        self.granularity = ",".join(parse_granularity(self.granularity))
        if self.samples < 2:
            raise BppError(f"--samples must be at least 2 (a baseline needs two masks per step), got {self.samples}")
        for name in ("steps", "batch_size", "init_windows"):
            if getattr(self, name) < 1:
                raise BppError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("seq_len", "init_seq_len"):
            if getattr(self, name) < 2:
                raise BppError(f"--{name.replace('_', '-')} must be at least 2, got {getattr(self, name)}")
        if not self.lr > 0:
            raise BppError(f"--lr must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise BppError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.baseline not in BASELINES:
            raise BppError(f"unknown baseline {self.baseline!r}; use one of {', '.join(BASELINES)}")
        if self.engine not in ENGINES:
            raise BppError(f"unknown engine {self.engine!r}; use one of {', '.join(ENGINES)}")
        if not 0.0 <= self.baseline_momentum < 1.0:
            raise BppError(f"baseline momentum must be in [0, 1), got {self.baseline_momentum}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PruneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def differences(self, other: "PruneConfig") -> list[str]:
        """``name: mine (checkpoint) vs other (now)`` for every field that differs."""
        return differences(self.to_dict(), other.to_dict())


def resolve_policy_defaults(config: PruneConfig) -> None:
    """Fill the options whose default depends on the policy, and check the issue-18 options."""
    if config.policy not in POLICIES:
        raise BppError(f"unknown policy {config.policy!r}; use one of {', '.join(POLICIES)}")
    defaults = UNITS_DEFAULTS if config.policy == "units" else ALLOCATION_DEFAULTS
    for name, value in defaults.items():
        if getattr(config, name) is None:
            setattr(config, name, value)
    if config.policy == "allocation":
        if config.budget != "params":
            raise BppError("--policy allocation has one parameter budget (KV groups and channels trade under "
                           "it); drop --budget count, or use --policy units")
        if parse_granularity(config.granularity) != ("channel", "group"):
            raise BppError("--policy allocation learns channels and KV groups together; use --granularity "
                           "channel,group (or --group-every 0 to keep the init's KV groups), or --policy units")
        if config.init == "uniform":
            raise BppError("--policy allocation starts from an init method's mask and --init uniform has none; "
                           "use --init besa, flap or wanda-sp")
        if config.sampling not in SAMPLINGS:
            raise BppError(f"unknown sampling {config.sampling!r}; use one of {', '.join(SAMPLINGS)}")
        if config.sampling == "antithetic" and config.samples % 2:
            raise BppError(f"--sampling antithetic draws pairs: --samples must be even, got {config.samples}")
    if config.optimizer not in OPTIMIZERS:
        raise BppError(f"unknown optimizer {config.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if config.objective not in OBJECTIVES:
        raise BppError(f"unknown objective {config.objective!r}; use one of {', '.join(OBJECTIVES)}")
    if config.basis < 0 or config.basis == 1:
        raise BppError(f"--basis must be 0 (one offset per layer) or at least 2 smooth profiles, got {config.basis}")
    if config.rank not in RANKS:
        raise BppError(f"unknown rank {config.rank!r}; use one of {', '.join(RANKS)}")
    if not config.sigma > 0:
        raise BppError(f"--sigma must be positive, got {config.sigma}")
    for name in ("group_every", "incumbent_every"):
        if getattr(config, name) < 0:
            raise BppError(f"--{name.replace('_', '-')} must be 0 (off) or positive, got {getattr(config, name)}")
    if config.selection_windows < 2 and config.incumbent_every:
        raise BppError(f"--selection-windows must be at least 2 (the incumbent is judged by paired "
                       f"differences over windows), got {config.selection_windows}")


def learning_rate(config: PruneConfig, step: int) -> float:
    """Cosine from lr at step 0 towards 0 at ``steps`` (torch's CosineAnnealingLR with
    T_max = steps, as the official code), or constant."""
    if config.schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / config.steps))


class MaskLosses:
    """Losses of masks on a batch: ``fn(ids, masks) -> (S,)`` and ``per_window(ids, masks) -> (S, B)``,
    with the bias compensation of :class:`bpp.compensation.BiasCompensation` when given, against the
    text's tokens (``objective="nll"``) or the dense model's next-token distribution ("soft")."""

    def __init__(self, engine=None, compensation=None, custom=None, objective: str = "nll"):
        self.engine, self.compensation, self.custom, self.objective = engine, compensation, custom, objective
        self._teachers: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids, e): the training batch, selection

    def teacher(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The dense model's targets for ``ids``, computed once per batch (the last few are kept:
        the selection windows come back at every incumbent check)."""
        if self.objective != "soft":
            return None
        for i, (known, e) in enumerate(self._teachers):
            if known.shape == ids.shape and torch.equal(known, ids):
                self._teachers.append(self._teachers.pop(i))
                return e
        self._teachers = self._teachers[-(TEACHER_CACHE - 1):] + [(ids.clone(), self.engine.teacher(ids))]
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
        for i in range(0, ids.shape[0], 4):  # 4 windows a pass bounds the activations
            part = ids[i:i + 4]
            out.append(self.engine.losses(part, masks, biases=biases, per_window=True, teacher=self.teacher(part)))
        return torch.cat(out, dim=1)


def _hook_losses_with_biases(model, ids: torch.Tensor, masks: Masks, compensation) -> torch.Tensor:
    """The ground truth with bias compensation: one Hugging Face forward per mask, the pruned
    inputs zeroed by hooks and each layer's compensation added to o_proj / down_proj's output."""
    from .models.hooks import hook_masks

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
        from .models.hooks import hook_losses

        if config.objective != "nll":
            raise BppError("--engine hooks evaluates the next-token loss only; pass --objective nll with it")
        losses = MaskLosses()
        losses.custom = lambda ids, masks: (hook_losses(model, ids, masks) if losses.compensation is None
                                            else _hook_losses_with_biases(model, ids, masks, losses.compensation))
        return losses, "hook_losses"
    from .models.masked import MaskedModel

    return MaskLosses(engine=MaskedModel(model), objective=config.objective), "MaskedModel"


def calibration_batches(ids: torch.Tensor, config: PruneConfig) -> torch.Tensor:
    """The calibration token stream cut into non-overlapping windows of ``seq_len``, shuffled by
    the seed; step t uses rows [t·B, (t+1)·B). One pass, no window twice (the official code runs
    one epoch), so the text must hold steps × batch_size windows."""
    n = ids.numel() // config.seq_len
    need = config.steps * config.batch_size
    if n < need:
        raise BppError(
            f"too little calibration text: {ids.numel()} tokens make {n} windows of {config.seq_len}, "
            f"but {config.steps} steps × batch size {config.batch_size} need {need}; lower --steps, "
            "--batch-size or --seq-len, or give more text with --data")
    windows = ids[: n * config.seq_len].view(n, config.seq_len)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    return windows[order[:need]].clone()


def selection_windows(ids: torch.Tensor, config: PruneConfig) -> torch.Tensor | None:
    """The incumbent's held-in windows: the last ``selection_windows`` of the seeded shuffle whose
    first ``steps × batch_size`` windows the gradient uses (so the two never overlap)."""
    if not config.incumbent_every:
        return None
    n = ids.numel() // config.seq_len
    need = config.steps * config.batch_size + config.selection_windows
    if n < need:
        raise BppError(f"too little calibration text: {n} windows of {config.seq_len} tokens, but {config.steps} "
                       f"steps × batch size {config.batch_size} and {config.selection_windows} selection windows "
                       f"need {need}; lower --steps, --batch-size or --selection-windows, or give more text with --data")
    windows = ids[: n * config.seq_len].view(n, config.seq_len)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    return windows[order[n - config.selection_windows:]].clone()


def needs_stats(config: PruneConfig) -> bool:
    """Whether the run needs FLAP's calibration statistics (bias compensation, FLAP ranking)."""
    return config.bias_compensation or (config.policy == "allocation" and config.rank == "flap")


class PolicyGradientLoop:
    """Runs the PG steps of one configuration from ``self.step`` to ``config.steps``."""

    def __init__(self, policy: Policy, losses_fn: LossesFn, windows: torch.Tensor, config: PruneConfig,
                 out_dir: Path | None = None, checkpoint_every: int = 0, progress: bool = True,
                 extra_state: dict | None = None):
        self.policy, self.losses_fn, self.windows, self.config = policy, losses_fn, windows, config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self.step = 0
        self.moving_baseline: float | None = None
        self.generator = torch.Generator().manual_seed(config.seed)
        self.skipped_steps = 0
        self.dropped_masks = 0
        self.seconds = 0.0  # time spent in steps, over all sessions
        self.extra_state = extra_state or {}  # carried through checkpoints (timings of earlier phases, ...)
        # issue 18: the incumbent and what judges it (set by the job; None: no incumbent)
        self.incumbent: Incumbent | None = None
        self.selection_losses = None  # (ids (n, T), masks) -> (S, n) per-window losses
        self.selection_ids = None
        self.snapshots: list[int] = []  # save the deterministic mask once this many masks were evaluated

    @property
    def evaluated(self) -> int:
        """Masks evaluated so far (both policies; for the sample-efficiency benchmark)."""
        return getattr(self, "evaluations", self.step * self.config.samples)

    def _save_snapshots(self) -> None:
        while self.snapshots and self.evaluated >= self.snapshots[0] and self.out_dir is not None:
            self.deterministic_mask().save(self.out_dir / f"snapshot_{self.snapshots.pop(0)}.safetensors")

    def deterministic_mask(self) -> Masks:
        """The mask the policy would output now (S = 1)."""
        return self.policy.final_mask()

    def postfix(self, record: dict) -> dict:
        return dict(loss=_fmt(record["mean_loss"]), baseline=_fmt(record["baseline"]),
                    entropy=f"{record['entropy']:.3f}", masks_s=_fmt(record["masks_per_s"], 1))

    def challenge_incumbent(self) -> dict | None:
        """Every ``incumbent_every`` steps and after the last: the deterministic mask against the
        incumbent on the selection windows (see :mod:`bpp.incumbent`); rank 0's alone (the others
        have no judge)."""
        every = self.config.incumbent_every
        if self.incumbent is None or self.selection_losses is None or not every or (self.step % every and self.step < self.config.steps):
            return None
        mask = self.deterministic_mask()
        t0 = time.perf_counter()
        losses = self.selection_losses(self.selection_ids, mask)[0]
        record = self.incumbent.challenge(mask, losses, self.step)
        record["seconds"] = time.perf_counter() - t0
        self.seconds += record["seconds"]
        return record

    # --- one step -----------------------------------------------------------------------
    def run_step(self) -> dict:
        cfg, policy = self.config, self.policy
        t0 = time.perf_counter()
        batch = self.windows[self.step * cfg.batch_size:(self.step + 1) * cfg.batch_size]
        masks, flat = policy.sample(cfg.samples, self.generator)
        device = torch.device(cfg.device)
        losses = self.losses_fn(batch.to(device), masks.to(device)).detach().float().cpu()
        valid = torch.isfinite(losses)
        lr = learning_rate(cfg, self.step)
        record = {"step": self.step, "lr": lr, "losses": [None if not math.isfinite(x) else x for x in losses.tolist()]}
        n_valid = int(valid.sum())
        self.dropped_masks += cfg.samples - n_valid
        usable = n_valid >= (2 if cfg.baseline == "leave-one-out" else 1)
        if usable:
            good = losses[valid]
            baseline, self.moving_baseline = loss_baseline(good, cfg.baseline, self.moving_baseline, cfg.baseline_momentum)
            # the official code divides by K − 1 whatever was dropped; leave-one-out needs the valid count
            divisor_samples = n_valid if cfg.baseline == "leave-one-out" else cfg.samples
            grad = policy.gradient(flat[valid], good, baseline, divisor_samples)
            policy.step(grad, lr)
            record.update(mean_loss=float(good.double().mean()), baseline=float(baseline), skipped=False)
        else:  # every loss NaN/inf: no update, no baseline change
            self.skipped_steps += 1
            record.update(mean_loss=None, baseline=self.moving_baseline, skipped=True)
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.step += 1
        record.update(valid=n_valid, entropy=policy.mean_entropy(), seconds=dt,
                      masks_per_s=cfg.samples / dt if dt > 0 else None)
        return record

    # --- the loop -----------------------------------------------------------------------
    def run(self) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=self.config.steps, initial=self.step, desc="policy gradient", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        metrics = open(self.out_dir / "metrics.jsonl", "a") if self.out_dir else None
        try:
            while self.step < self.config.steps:
                record = self.run_step()
                selection = self.challenge_incumbent()
                if selection is not None:
                    record["selection"] = selection
                self._save_snapshots()
                if metrics:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                bar.update(1)
                bar.set_postfix(self.postfix(record))
                if self.out_dir and self.checkpoint_every and self.step % self.checkpoint_every == 0 \
                        and self.step < self.config.steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            if metrics:
                metrics.close()

    # --- checkpoint/resume ------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "step": self.step,
            "theta": self.policy.theta.clone() if hasattr(self.policy, "theta") else None,
            "moving_baseline": self.moving_baseline,
            "schedule": {"kind": self.config.schedule, "lr": self.config.lr, "total_steps": self.config.steps},
            "optimizer": {"kind": "plain step θ ← θ − lr·ĝ (stateless)"},
            "generator": self.generator.get_state(),
            "rng": rng_state(),
            "data": {"cursor": self.step * self.config.batch_size, "windows": fingerprint(self.windows)},
            "space": dataclasses.asdict(self.policy.space),
            "counters": {"skipped_steps": self.skipped_steps, "dropped_masks": self.dropped_masks,
                         "seconds": self.seconds},
            "extra": self.extra_state,
            "incumbent": None if self.incumbent is None else self.incumbent.state(),
        }

    def save_checkpoint(self, path: Path | None = None) -> Path:
        path = Path(path) if path else self.out_dir / CHECKPOINT
        return save_checkpoint(self.state_dict(), path)

    def load_state_dict(self, state: dict) -> None:
        saved = PruneConfig.from_dict(state["config"])
        diff = saved.differences(self.config)
        if diff:
            raise BppError("the checkpoint was made with a different configuration: " + "; ".join(diff))
        if state["space"] != dataclasses.asdict(self.policy.space):
            raise BppError("the checkpoint was made for a different model (its prunable units differ)")
        if state["data"]["windows"] != fingerprint(self.windows):
            raise BppError("the calibration text differs from the one the checkpoint was made with")
        self.step = int(state["step"])
        if state["theta"] is not None:
            self.policy.theta = state["theta"].to(torch.float64).clone()
        self.moving_baseline = state["moving_baseline"]
        self.generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        c = state["counters"]
        self.skipped_steps, self.dropped_masks, self.seconds = c["skipped_steps"], c["dropped_masks"], c["seconds"]
        self.extra_state = dict(state.get("extra", {}))
        if state.get("incumbent") is not None:
            self.incumbent = Incumbent.from_state(state["incumbent"])


def _fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"
