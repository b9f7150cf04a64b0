"""What determines a LoRA recovery run (:class:`RecoverConfig`), its learning-rate schedule, the
projections it adapts, and its training windows; the training itself is
:mod:`bpp.methods.lora_recovery`."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..checkpoints import differences
from ..errors import BppError
from ..modelio import PROJECTIONS
from ..models.blocks import GRADIENT_ENGINES

TARGET_MODULES = PROJECTIONS  # LoRA on every projection of a decoder block
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class RecoverConfig:
    """Everything that determines the recovered weights (a resumed run must match it)."""

    steps: int = 50
    rank: int = 8  # LLM-Pruner / FLAP / the PG paper: r = 8, alpha = 16
    alpha: float = 16.0
    dropout: float = 0.0  # LLM-Pruner uses 0.05; 0 keeps short runs deterministic without an RNG
    lr: float = 5e-4
    batch_size: int = 4
    seq_len: int = 128
    schedule: str = "cosine"
    warmup: float = 0.1  # fraction of the steps with a linear warm-up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 0
    target_modules: tuple[str, ...] = TARGET_MODULES
    engine: str = "auto"  # "kernels" (bpp_kernels ops), "hf" (the peft model's forward), "auto": kernels where they can

    def validate(self) -> "RecoverConfig":
        checks = [
            (isinstance(self.steps, int) and self.steps >= 1, f"steps must be at least 1, got {self.steps}"),
            (isinstance(self.rank, int) and self.rank >= 1, f"LoRA rank must be at least 1, got {self.rank}"),
            (self.alpha > 0, f"LoRA alpha must be positive, got {self.alpha}"),
            (0 <= self.dropout < 1, f"LoRA dropout must be in [0, 1), got {self.dropout}"),
            (math.isfinite(self.lr) and self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.seq_len >= 2, f"seq_len must be at least 2, got {self.seq_len}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}"),
            (0 <= self.warmup < 1, f"warm-up must be a fraction of the steps in [0, 1), got {self.warmup}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.max_grad_norm >= 0, f"max grad norm must be >= 0, got {self.max_grad_norm}"),
            (len(self.target_modules) > 0, "no LoRA target modules given"),
            (self.engine in GRADIENT_ENGINES, f"recovery engine must be one of {', '.join(GRADIENT_ENGINES)}, got {self.engine!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BppError(message)
        self.target_modules = tuple(self.target_modules)
        return self

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup * self.steps)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RecoverConfig":
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        if "target_modules" in d:
            d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)

    def differences(self, other: "RecoverConfig") -> list[str]:
        return differences(self.to_dict(), other.to_dict())


def lr_factor(step: int, *, steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warm-up over
    ``warmup_steps`` (reaching the peak at step ``warmup_steps``; step 0 is not wasted at 0),
    then cosine / linear decay towards 0 at ``steps`` (the last step's rate is still > 0)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def present_targets(model, wanted=TARGET_MODULES) -> list[str]:
    """The names in ``wanted`` that name at least one ``nn.Linear`` of ``model`` (a compacted layer
    with no attention or no MLP has no q/k/v/o or gate/up/down there; a model may have none at all)."""
    found = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return [t for t in wanted if t in found]


def recovery_windows(tokenizer, text_or_ids, config: RecoverConfig, bos: int | None = None) -> torch.Tensor:
    """``steps · batch_size`` random windows of ``seq_len`` tokens, drawn once from ``seed`` (each
    starting with ``bos`` when given, :func:`bpp.data.window_bos`). Refuses text shorter than the
    tokens the run reads (it would mostly repeat itself)."""
    from ..data import tokenize, windows

    ids = tokenize(tokenizer, text_or_ids) if isinstance(text_or_ids, str) else torch.as_tensor(text_or_ids)
    ids = ids.reshape(-1)
    n = config.steps * config.batch_size
    need = n * config.seq_len
    if ids.numel() < need:
        raise BppError(f"too little text for {config.steps} steps: the training text has {ids.numel():,} tokens, "
                       f"{config.steps} steps x {config.batch_size} windows x {config.seq_len} tokens need "
                       f"{need:,}; lower --steps, --batch-size or --seq-len, or give more text (--data file.txt)")
    return windows(tokenizer, ids, config.seq_len, n, seed=config.seed, bos=bos)
