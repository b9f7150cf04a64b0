"""The policy-gradient loop and the whole ``bpp prune`` job around it.

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
import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import BppError
from .init import CALIBRATED_INITS
from .policy import BASELINES, Policy, advantages, check_sparsity, parse_granularity
from .space import Masks, MaskSpace

SCHEDULES = ("cosine", "constant")
ENGINES = ("batched", "hooks")  # how mask losses are computed: bpp.MaskedModel, or the hook ground truth
CHECKPOINT = "checkpoint.pt"
OUTPUT_FILES = ("mask.safetensors", "theta.safetensors", "init_mask.safetensors", "metrics.jsonl", "report.json",
                "config.json", "kept_per_layer.png", "loss_curve.png", CHECKPOINT)

LossesFn = Callable[[torch.Tensor, Masks], torch.Tensor]


@dataclass
class PruneConfig:
    """Everything that determines the result of a run (a resumed run must match it)."""

    model: str = "default"
    data: str = "default"
    sparsity: float = 0.2
    granularity: str = "channel,group"
    budget: str = "count"
    steps: int = 100  # ~9 min of PG on 2 CPU cores for the embedded default at S=8, B=2 (whole job < 15 min)
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
        """``name: mine != other`` for every field that differs."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} (checkpoint) vs {b[k]!r} (now)" for k in a if a[k] != b[k]]


def learning_rate(config: PruneConfig, step: int) -> float:
    """Cosine from lr at step 0 towards 0 at ``steps`` (torch's CosineAnnealingLR with
    T_max = steps, as the official code), or constant."""
    if config.schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / config.steps))


def default_losses(model, engine: str = "batched") -> tuple[LossesFn, str]:
    """The batched engine ``MaskedModel(model).losses``, or the slow hook ground truth when
    asked for or when the batched engine cannot be imported."""
    from .models.hooks import hook_losses

    if engine == "hooks":
        return (lambda ids, masks: hook_losses(model, ids, masks)), "hook_losses"
    try:
        from .models.masked import MaskedModel
    except ImportError as e:
        warnings.warn(f"bpp.MaskedModel is unavailable ({e}); evaluating masks with the slow hook "
                      "ground truth (one full forward per mask)", stacklevel=2)
        return (lambda ids, masks: hook_losses(model, ids, masks)), "hook_losses"
    return MaskedModel(model).losses, "MaskedModel"


def training_windows(ids: torch.Tensor, config: PruneConfig) -> torch.Tensor:
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


def fingerprint(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def _atomic_write_bytes(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
            baseline, self.moving_baseline = advantages(good, cfg.baseline, self.moving_baseline, cfg.baseline_momentum)
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
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
            "data": {"cursor": self.step * self.config.batch_size, "windows": fingerprint(self.windows)},
            "space": dataclasses.asdict(self.policy.space),
            "counters": {"skipped_steps": self.skipped_steps, "dropped_masks": self.dropped_masks,
                         "seconds": self.seconds},
            "extra": self.extra_state,
        }

    def save_checkpoint(self, path: Path | None = None) -> Path:
        path = Path(path) if path else self.out_dir / CHECKPOINT
        state = self.state_dict()
        _atomic_write_bytes(path, lambda tmp: torch.save(state, tmp))
        return path

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
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        c = state["counters"]
        self.skipped_steps, self.dropped_masks, self.seconds = c["skipped_steps"], c["dropped_masks"], c["seconds"]
        self.extra_state = dict(state.get("extra", {}))


def _fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"


def load_checkpoint(out_dir: Path) -> dict:
    path = Path(out_dir) / CHECKPOINT
    if not path.is_file():
        raise BppError(f"{out_dir} has no {CHECKPOINT} to resume from; start a new run with --out (and --force)")
    return torch.load(path, weights_only=False)


# --- the whole job -----------------------------------------------------------------------------

def _prepare_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BppError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise BppError(f"{out} already exists and is not empty; pass --force to overwrite it, "
                           "or --resume to continue the run in it")
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
        if (out / "model" / "config.json").is_file():
            shutil.rmtree(out / "model")
    out.mkdir(parents=True, exist_ok=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of steps at or after ``step`` (they are re-run after a resume)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] < step]
    _atomic_write_bytes(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in keep)))


def masked_perplexity(model, tokenizer, ids: torch.Tensor, mask: Masks | None, seq_len: int,
                      max_windows: int | None) -> float:
    from .evaluate import perplexity
    from .models.hooks import hook_masks

    if mask is None:
        return perplexity(model, tokenizer, ids, seq_len=seq_len, max_windows=max_windows)
    with hook_masks(model, mask):
        return perplexity(model, tokenizer, ids, seq_len=seq_len, max_windows=max_windows)


def param_summary(space: MaskSpace, policy: Policy, mask: Masks | None) -> dict | None:
    if mask is None:
        return None
    kept = int(space.params(mask)[0])
    learned = float(policy.costs.sum())
    eff = mask.effective()
    removed_prunable = space.total_params - kept
    return {
        "params": kept,
        "sparsity_of_model": 1 - kept / space.total_params,
        "sparsity_of_learned_units": removed_prunable / learned,
        "kept_channels": int(eff.channels.sum()), "kept_groups": int(eff.groups.sum()),
        "kept_layers": int(mask.layers.sum()),
    }


def prune(config: PruneConfig, out: str | os.PathLike, *, force: bool = False, resume: bool = False,
          checkpoint_every: int = 20, eval_windows: int | None = None, eval_seq_len: int = 128,
          evaluate: bool = True, progress: bool = True, model=None, tokenizer=None,
          losses_fn: LossesFn | None = None, compact: bool = True) -> dict:
    """The ``bpp prune`` job: returns the report (also written to ``out/report.json``).

    ``model``/``tokenizer`` may be passed in (benchmarks reuse one loaded model); ``losses_fn``
    replaces the default batched engine."""
    from .data import load_text, tokenize
    from .init import initialise
    from .load import load_model

    t_start = time.perf_counter()
    config.validate()
    from .distributed import ShardedLosses, setup

    rank, world_size = setup(config.device)
    writer = rank == 0  # rank 0 alone writes; every rank computes the same θ
    out = Path(out)
    state = None
    if resume:
        state = load_checkpoint(out)
        if (out / "report.json").is_file():
            raise BppError(f"{out} holds a finished run (report.json exists); nothing to resume")
        diff = PruneConfig.from_dict(state["config"]).differences(config)
        if diff:
            raise BppError("--resume: the run in " + str(out) + " was made with a different configuration: "
                           + "; ".join(diff))
    elif writer:
        _prepare_out_dir(out, force)
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # the folder is ready (or the writer failed) before anyone goes on

    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = load_model(None if config.model == "default" else config.model,
                                      dtype=config.dtype, device=config.device, device_map=config.device_map)
    space = MaskSpace.from_model(model)
    calib_ids = tokenize(tokenizer, load_text(config.data, "calib"))
    windows = training_windows(calib_ids, config)  # checks there is enough text before any work
    policy = Policy(space, config.granularity, config.sparsity, config.budget)
    if losses_fn is None:
        losses_fn, backend = default_losses(model, config.engine)
    else:
        backend = getattr(losses_fn, "__qualname__", "custom")
    if world_size > 1:
        losses_fn = ShardedLosses(losses_fn, rank, world_size)
        backend = f"{backend} sharded over {world_size} ranks"
    load_seconds = time.perf_counter() - t0

    loop = PolicyGradientLoop(policy, losses_fn, windows, config, out if writer else None, checkpoint_every,
                              progress and writer)
    if state is not None:
        loop.load_state_dict(state)
        init_mask = Masks.load(out / "init_mask.safetensors") if (out / "init_mask.safetensors").is_file() else None
        if writer:
            _truncate_metrics(out / "metrics.jsonl", loop.step)
        loop.extra_state["sessions"] = loop.extra_state.get("sessions", 1) + 1
    else:
        if writer:
            (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        t0 = time.perf_counter()
        init_calib = None
        if config.init in CALIBRATED_INITS:
            from .data import windows as random_windows

            init_calib = random_windows(tokenizer, calib_ids, config.init_seq_len, config.init_windows, seed=config.seed)
        with torch.no_grad():
            _, init_mask, _ = initialise(policy, config.init, model, init_calib)
        if init_mask is not None and writer:
            init_mask.save(out / "init_mask.safetensors")
        loop.extra_state = {"init_seconds": time.perf_counter() - t0, "sessions": 1}
        if writer:
            loop.save_checkpoint()  # step 0: a kill during the first steps can still resume

    with torch.no_grad():
        loop.run()
    if not writer:  # outputs and evaluation are rank 0's
        return {"rank": rank, "world_size": world_size, "steps_done": loop.step}
    loop.save_checkpoint()  # the final state, so a kill during evaluation can resume straight to it
    final_mask = policy.final_mask()
    final_mask.save(out / "mask.safetensors")
    theta = policy.theta_masks()
    theta.save(out / "theta.safetensors")

    t0 = time.perf_counter()
    perplexities = {}
    if evaluate:
        held = tokenize(tokenizer, load_text(config.data, "heldout"))
        with torch.no_grad():
            perplexities["dense"] = masked_perplexity(model, tokenizer, held, None, eval_seq_len, eval_windows)
            if init_mask is not None:
                perplexities["init_mask"] = masked_perplexity(model, tokenizer, held, init_mask, eval_seq_len, eval_windows)
            perplexities["final_mask"] = masked_perplexity(model, tokenizer, held, final_mask, eval_seq_len, eval_windows)
    eval_seconds = time.perf_counter() - t0

    report = {
        "config": config.to_dict(),
        "losses_backend": backend,
        "world_size": world_size,
        "steps_done": loop.step,
        "skipped_steps": loop.skipped_steps,
        "dropped_masks": loop.dropped_masks,
        "sessions": loop.extra_state.get("sessions", 1),
        "params": {
            "dense": space.total_params,
            "prunable": space.prunable_params,
            "learned_units": float(policy.costs.sum()),
            "budget_targets": {p.name: p.target for p in policy.parts},
            "init_mask": param_summary(space, policy, init_mask),
            "final_mask": param_summary(space, policy, final_mask),
        },
        "perplexity": {"data": f"{config.data}/heldout", "seq_len": eval_seq_len, "max_windows": eval_windows,
                       **perplexities},
        "theta": {"mean_entropy": policy.mean_entropy(),
                  "fraction_at_0_or_1": float(((policy.theta == 0) | (policy.theta == 1)).double().mean())},
        "timings_s": {
            "load_this_session": load_seconds,
            "init": loop.extra_state.get("init_seconds"),
            "policy_gradient": loop.seconds,
            "per_step": loop.seconds / max(loop.step, 1),
            "evaluation": eval_seconds,
        },
    }
    plot_kept_per_layer(out / "kept_per_layer.png", space, final_mask, init_mask)
    plot_loss_curve(out / "loss_curve.png", out / "metrics.jsonl")
    if compact:
        report["compacted_model"] = _save_compacted(model, tokenizer, final_mask, out / "model")
    report["timings_s"]["total_this_session"] = time.perf_counter() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _save_compacted(model, tokenizer, mask: Masks, path: Path) -> dict | None:
    """Compact and save the pruned model when the compaction module exists (it is optional). A
    failure there does not lose the run: mask and θ are already saved, and the report says why."""
    try:
        from .compact import save_compacted
    except ImportError:
        return None
    try:
        saved = save_compacted(model, mask, path, tokenizer=tokenizer, force=True)
    except BppError as e:
        warnings.warn(f"compaction failed: {e}; the mask is saved, run `bpp compact` on it later", stacklevel=2)
        return {"path": None, "error": str(e)}
    return {"path": str(saved)}


# --- plots -------------------------------------------------------------------------------------

def plot_kept_per_layer(path: Path, space: MaskSpace, final_mask: Masks, init_mask: Masks | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = np.arange(space.n_layers)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharex=True)
    for ax, field, title in ((axes[0], "channels", "MLP channels kept"), (axes[1], "groups", "KV groups kept")):
        for mask, label, style in ((init_mask, "init mask (layer-uniform)", "--"), (final_mask, "final mask", "-")):
            if mask is None:
                continue
            eff = mask.effective()
            ax.plot(layers, getattr(eff, field)[0].float().mean(-1).numpy(), style, marker="o", ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction kept")
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss_curve(path: Path, metrics_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] \
        if metrics_path.is_file() else []
    steps = [r["step"] for r in records if r.get("mean_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if steps:
        ax.plot(steps, [r["mean_loss"] for r in records if r.get("mean_loss") is not None], lw=0.8,
                alpha=0.6, label="mean loss of the step's masks")
        ax.plot(steps, [r["baseline"] for r in records if r.get("mean_loss") is not None], lw=1.5, label="baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("calibration NLL")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
