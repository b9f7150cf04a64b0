"""The policy-gradient loop: the configuration of a run, the calibration batches, the steps, and
the state that makes a run resumable (the ``bpp prune`` job around it: :mod:`bpp.jobs.prune`).

One step: draw S masks from the policy, evaluate their losses on one calibration batch (the
same batch for all S), drop masks whose loss is not finite, form the baseline, take a plain
gradient step on θ with the scheduled learning rate and project θ back onto the budget.

State that makes a run resumable bit for bit (written atomically every ``checkpoint_every``
steps, and at step 0): θ, the moving baseline, the step (which is also the data cursor and the
schedule position: batches are consecutive slices of a seeded shuffle, and the learning rate is
a function of the step), the mask-sampling generator, the global torch/Python/NumPy RNG states,
the counters and timings. The optimiser is the official plain step θ ← θ − lr·ĝ, which has no
state of its own.
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
from .modelio import check_device
from .policy import BASELINES, Policy, check_sparsity, loss_baseline, parse_granularity
from .runs import CHECKPOINT, differences, fingerprint, rng_state, save_checkpoint, set_rng_state
from .space import Masks

SCHEDULES = ("cosine", "constant")
ENGINES = ("batched", "hooks")  # how mask losses are computed: bpp.MaskedModel, or the hook ground truth

LossesFn = Callable[[torch.Tensor, Masks], torch.Tensor]


@dataclass
class PruneConfig:
    """Everything that determines the result of a run (a resumed run must match it)."""

    model: str = "default"
    data: str = "default"
    sparsity: float = 0.2
    granularity: str = "channel,group"
    budget: str = "count"
    steps: int = 100  # sized so the default job fits a CPU budget (README: its measured wall time)
    samples: int = 8
    batch_size: int = 2
    seq_len: int = 128
    lr: float = 6e-3
    schedule: str = "cosine"
    baseline: str = "moving-average"
    baseline_momentum: float = 0.8  # the official moving average over a window of 5: 1 − 1/5
    init: str = "wanda-sp"
    init_windows: int = 32
    init_seq_len: int = 256
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    device_map: str | None = None  # e.g. "auto": layers over the GPUs of a node, for models too large for one
    engine: str = "batched"

    def validate(self) -> "PruneConfig":
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


def learning_rate(config: PruneConfig, step: int) -> float:
    """Cosine from lr at step 0 towards 0 at ``steps`` (torch's CosineAnnealingLR with
    T_max = steps, as the official code), or constant."""
    if config.schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / config.steps))


def default_losses(model, engine: str = "batched") -> tuple[LossesFn, str]:
    """How mask losses are computed: the batched engine ``MaskedModel(model).losses``, or the
    slow hook ground truth (one Hugging Face forward per mask)."""
    from .models.hooks import hook_losses
    from .models.masked import MaskedModel

    if engine == "hooks":
        return (lambda ids, masks: hook_losses(model, ids, masks)), "hook_losses"
    return MaskedModel(model).losses, "MaskedModel"


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
                if metrics:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                bar.update(1)
                bar.set_postfix(loss=_fmt(record["mean_loss"]), baseline=_fmt(record["baseline"]),
                                entropy=f"{record['entropy']:.3f}", masks_s=_fmt(record["masks_per_s"], 1))
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
            "theta": self.policy.theta.clone(),
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
        self.policy.theta = state["theta"].to(torch.float64).clone()
        self.moving_baseline = state["moving_baseline"]
        self.generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        c = state["counters"]
        self.skipped_steps, self.dropped_masks, self.seconds = c["skipped_steps"], c["dropped_masks"], c["seconds"]
        self.extra_state = dict(state.get("extra", {}))


def _fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"
