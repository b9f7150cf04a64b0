"""Recovery fine-tuning of a pruned model: LoRA adapters trained on calibration text, then merged
back into the weights, so the result is a plain dense model of the same (compacted) architecture.

LLM-Pruner, FLAP and the policy-gradient paper recover a pruned model with LoRA (rank 8, alpha
16) on the q/k/v/o and gate/up/down projections; bpp does the same with ``peft``: the base
weights stay frozen, AdamW updates the adapters only, the loss is next-token cross-entropy on
random calibration windows (:func:`bpp.data.windows`), the learning rate warms up linearly
and then follows a cosine (or linear, or constant) schedule; ``merge_and_unload`` folds each
adapter ``(alpha / rank) · B A`` into its weight.

Resumable: every ``checkpoint_every`` steps (and at the end of training) the adapters, the
optimiser and scheduler states, the run's RNG state, the step and the loss curve are written
atomically to ``checkpoint_dir/checkpoint.pt``; a resumed run reproduces an uninterrupted one
(the step is the data cursor: the windows are drawn once from the seed, batch k is rows
``k·B … (k+1)·B``). The run draws its random numbers (LoRA dropout) from its own seeded torch
RNG stream, swapped in while it trains, so the caller's global RNG is neither used nor changed.

``load_pruned`` / ``save_recovered`` / ``run_recover`` are the ``bpp recover`` job around it:
load a ``bpp compact`` / ``bpp prune`` model folder (stock config, or per-layer sizes with the
shipped ``modeling_bpp.py``), fine-tune, and save a folder that loads exactly like the input.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import BppError

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULES = ("cosine", "linear", "constant")
CHECKPOINT = "checkpoint.pt"
MODELING_FILE = "modeling_bpp.py"


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
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} (checkpoint) vs {b[k]!r} (now)" for k in a if a[k] != b[k]]


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


def _model_signature(model) -> str:
    """Names and shapes of the parameters, plus the bytes of the first target weight: a resumed
    run must start from the same base model."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGET_MODULES:
            h.update(m.weight.detach().float().cpu().contiguous().numpy().tobytes())
            break
    return h.hexdigest()[:16]


def _fingerprint(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def training_windows(tokenizer, text_or_ids, config: RecoverConfig) -> torch.Tensor:
    """``steps · batch_size`` random windows of ``seq_len`` tokens, drawn once from ``seed``.
    Refuses text shorter than the tokens the run reads (it would mostly repeat itself)."""
    from .data import tokenize, windows

    ids = tokenize(tokenizer, text_or_ids) if isinstance(text_or_ids, str) else torch.as_tensor(text_or_ids)
    ids = ids.reshape(-1)
    n = config.steps * config.batch_size
    need = n * config.seq_len
    if ids.numel() < need:
        raise BppError(f"too little text for {config.steps} steps: the training text has {ids.numel():,} tokens, "
                       f"{config.steps} steps x {config.batch_size} windows x {config.seq_len} tokens need "
                       f"{need:,}; lower --steps, --batch-size or --seq-len, or give more text (--data file.txt)")
    return windows(tokenizer, ids, config.seq_len, n, seed=config.seed)


class LoraRecovery:
    """LoRA adapters on ``model`` (modified in place) and their training loop.

    ``peft_model`` is the wrapped model while training; :meth:`merge` folds the adapters in and
    returns the plain model (the same object as ``model``)."""

    def __init__(self, model, tokenizer, train_ids, config: RecoverConfig | None = None, *,
                 checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 10,
                 progress: bool = True, on_step: Callable[[dict], None] | None = None,
                 extra_state: dict | None = None):
        from peft import LoraConfig, get_peft_model

        self.config = (config or RecoverConfig()).validate()
        if checkpoint_every < 0:
            raise BppError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every, self.progress, self.on_step = checkpoint_every, progress, on_step
        self.extra_state = dict(extra_state or {})
        self.windows = training_windows(tokenizer, train_ids, self.config)
        targets = present_targets(model, self.config.target_modules)
        if not targets:
            raise BppError(f"the model has none of the LoRA target modules {', '.join(self.config.target_modules)}")
        self.targets = targets
        self.signature = _model_signature(model)
        self.was_training = model.training
        self.device = next(model.parameters()).device
        lora = LoraConfig(r=self.config.rank, lora_alpha=self.config.alpha, lora_dropout=self.config.dropout,
                          target_modules=targets, bias="none", task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]):  # the adapters' init is seeded; the caller's RNG is left alone
            torch.manual_seed(self.config.seed)
            self.peft_model = get_peft_model(model, lora)
        self.params = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        schedule = functools.partial(lr_factor, steps=self.config.steps, warmup_steps=self.config.warmup_steps,
                                     schedule=self.config.schedule)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.step = 0
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.grad_norms: list[float] = []
        self.seconds = 0.0
        self.sessions = 1
        # the run's own RNG stream (dropout), swapped in while training: {"cpu": state, "cuda": state | None}
        self.rng = {"cpu": torch.Generator().manual_seed(self.config.seed).get_state(), "cuda": None}

    # --- training ----------------------------------------------------------------------------
    def run_step(self) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        batch = self.windows[self.step * cfg.batch_size:(self.step + 1) * cfg.batch_size].to(self.device)
        lr = self.scheduler.get_last_lr()[0]
        loss = self.peft_model(input_ids=batch, labels=batch, use_cache=False).loss
        value = float(loss.detach())
        if not math.isfinite(value):
            raise BppError(f"the training loss became {value} at step {self.step}; lower --lr "
                           f"(now {cfg.lr:g}) and resume or start again")
        loss.backward()
        if cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params])))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        record = {"step": self.step, "loss": value, "lr": lr, "grad_norm": grad_norm, "seconds": dt}
        self.losses.append(value)
        self.lrs.append(lr)
        self.grad_norms.append(grad_norm)
        self.seconds += dt
        self.step += 1
        return record

    def train(self) -> "LoraRecovery":
        from tqdm.auto import tqdm

        cfg = self.config
        bar = tqdm(total=cfg.steps, initial=self.step, desc="LoRA recovery", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        self.peft_model.train()
        cuda = self.device.type == "cuda"
        try:
            with torch.enable_grad(), torch.random.fork_rng(devices=[self.device] if cuda else []):
                torch.set_rng_state(self.rng["cpu"])
                if cuda:
                    if self.rng["cuda"] is None:
                        torch.cuda.manual_seed(self.config.seed)
                    else:
                        torch.cuda.set_rng_state(self.rng["cuda"], self.device)
                while self.step < cfg.steps:
                    record = self.run_step()
                    self.rng = {"cpu": torch.get_rng_state(),
                                "cuda": torch.cuda.get_rng_state(self.device) if cuda else None}
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    if self.checkpoint_dir and self.checkpoint_every and self.step % self.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self.on_step is not None:
                        self.on_step(record)
            if self.checkpoint_dir:
                self.save_checkpoint()  # the final state: a kill while merging or saving resumes straight here
        finally:
            bar.close()
            self.peft_model.train(self.was_training)
        return self

    def merge(self):
        """Fold the adapters into the base weights; the plain model, in its former train/eval mode."""
        model = self.peft_model.merge_and_unload()
        return model.train(self.was_training)

    # --- checkpoint / resume -------------------------------------------------------------------
    def state_dict(self) -> dict:
        from peft import get_peft_model_state_dict

        return {
            "config": self.config.to_dict(),
            "step": self.step,
            "adapters": {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.peft_model).items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": dict(self.rng),
            "data": {"cursor": self.step * self.config.batch_size, "windows": _fingerprint(self.windows)},
            "model": self.signature,
            "targets": self.targets,
            "curves": {"loss": list(self.losses), "lr": list(self.lrs), "grad_norm": list(self.grad_norms)},
            "seconds": self.seconds,
            "sessions": self.sessions,
            "extra": self.extra_state,
        }

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        path = Path(path) if path else self.checkpoint_dir / CHECKPOINT
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(self.state_dict(), path)
        return path

    def load_state_dict(self, state: dict) -> None:
        from peft import set_peft_model_state_dict

        diff = RecoverConfig.from_dict(state["config"]).differences(self.config)
        if diff:
            raise BppError("the checkpoint was made with a different configuration: " + "; ".join(diff))
        if state["model"] != self.signature:
            raise BppError("the checkpoint was made for a different model (its weights or shapes differ)")
        if state["data"]["windows"] != _fingerprint(self.windows):
            raise BppError("the training text differs from the one the checkpoint was made with")
        set_peft_model_state_dict(self.peft_model, {k: v.to(self.device) for k, v in state["adapters"].items()})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rng = dict(state["rng"])
        self.step = int(state["step"])
        curves = state["curves"]
        self.losses, self.lrs, self.grad_norms = list(curves["loss"]), list(curves["lr"]), list(curves["grad_norm"])
        self.seconds = float(state["seconds"])
        self.sessions = int(state["sessions"]) + 1
        self.extra_state = dict(state.get("extra", {}))

    def resume(self) -> bool:
        """Load ``checkpoint_dir/checkpoint.pt`` when there is one; whether it did."""
        path = self.checkpoint_dir / CHECKPOINT if self.checkpoint_dir else None
        if path is None or not path.is_file():
            return False
        self.load_state_dict(torch.load(path, weights_only=False, map_location="cpu"))
        return True

    def log(self) -> dict:
        return {"config": self.config.to_dict(), "target_modules": self.targets,
                "trainable_params": self.trainable_params, "steps_done": self.step, "sessions": self.sessions,
                "loss": list(self.losses), "lr": list(self.lrs), "grad_norm": list(self.grad_norms),
                "train_seconds": self.seconds, "seconds_per_step": self.seconds / max(1, len(self.losses))}


def recover(model, tokenizer, train_ids, *, steps: int = 50, rank: int = 8, alpha: float = 16.0,
            lr: float = 5e-4, batch_size: int = 4, seq_len: int = 128, schedule: str = "cosine",
            warmup: float = 0.1, dropout: float = 0.0, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
            target_modules=TARGET_MODULES, seed: int = 0, progress: bool = True,
            checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 10, resume: bool = False,
            on_step: Callable[[dict], None] | None = None, extra_state: dict | None = None):
    """LoRA-fine-tune ``model`` on next-token prediction over ``train_ids`` (1-D token ids, or
    text) and merge the adapters: ``(merged_model, log)``. The merged model is ``model`` itself,
    its target weights updated in place (pass a copy to keep the original); everything else in it
    is untouched. ``log`` holds the configuration, the per-step loss / learning rate / gradient
    norm, the trainable parameter count and timings.

    ``checkpoint_dir``: where ``checkpoint.pt`` goes every ``checkpoint_every`` steps; with
    ``resume=True`` a checkpoint there is continued (same config, model and text, or a BppError).
    ``on_step(record)`` is called after each step (and its checkpoint). Works under
    ``torch.no_grad()``."""
    config = RecoverConfig(steps=steps, rank=rank, alpha=alpha, dropout=dropout, lr=lr, batch_size=batch_size,
                           seq_len=seq_len, schedule=schedule, warmup=warmup, weight_decay=weight_decay,
                           max_grad_norm=max_grad_norm, seed=seed, target_modules=tuple(target_modules))
    if resume and checkpoint_dir is None:
        raise BppError("resume needs a checkpoint_dir")
    job = LoraRecovery(model, tokenizer, train_ids, config, checkpoint_dir=checkpoint_dir,
                       checkpoint_every=checkpoint_every, progress=progress, on_step=on_step,
                       extra_state=extra_state)
    if resume:
        job.resume()
    job.train()
    t0 = time.perf_counter()
    merged = job.merge()
    log = job.log()
    log["merge_seconds"] = time.perf_counter() - t0
    log["extra"] = job.extra_state
    return merged, log


# --- the `bpp recover` job: load a pruned folder, fine-tune, save a folder that loads the same way ---

def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The model folder: ``path`` itself, or ``path/model`` for a ``bpp prune`` / ``bpp baseline``
    output folder."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise BppError(f"model folder {str(path)!r} does not exist")
    if not folder.is_dir():
        raise BppError(f"{str(path)!r} is not a folder (give the model folder that bpp compact or bpp prune wrote)")
    if (folder / "config.json").is_file():
        return folder
    if (folder / "model" / "config.json").is_file():
        return folder / "model"
    raise BppError(f"{str(path)!r} has no config.json (nor model/config.json): not a model folder")


def load_pruned(path: str | os.PathLike, dtype: str | torch.dtype | None = "float32", device: str = "cpu",
                trust_remote_code: bool = False):
    """``(model, tokenizer, folder)`` for a compacted model folder: a stock config of a supported
    family, or bpp's per-layer-size config whose ``modeling_bpp.py`` is bpp's own (then it is
    loaded from bpp's copy of that code, not executed from the folder; a different file runs
    only with ``trust_remote_code``)."""
    from transformers import AutoModelForCausalLM

    from .compact import _modeling_module, modeling_source
    from .load import SUPPORTED_FAMILIES, parse_dtype

    folder = resolve_model_dir(path)
    torch_dtype = parse_dtype(dtype)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise BppError(f"cannot read {folder / 'config.json'}: {e}") from None
    model_type = str(config.get("model_type"))
    prefix = "bpp_pruned_"
    if model_type in SUPPORTED_FAMILIES:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    elif model_type.startswith(prefix) and model_type[len(prefix):] in SUPPORTED_FAMILIES:
        family = model_type[len(prefix):]
        shipped = folder / MODELING_FILE
        if not shipped.is_file():
            raise BppError(f"{folder} has a per-layer-size config ({model_type}) but no {MODELING_FILE}")
        if shipped.read_text() == modeling_source(family):
            model = _modeling_module(family).BppPrunedForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        elif trust_remote_code:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, trust_remote_code=True)
        else:
            raise BppError(f"{shipped} differs from the modeling file this bpp writes (another bpp version, or "
                           "edited); pass --trust-remote-code to load it with its own code")
    else:
        raise BppError(f"{folder}: model type {model_type!r} is not supported; give a folder written by "
                       f"bpp compact / bpp prune, or a model of the families {', '.join(SUPPORTED_FAMILIES)}")
    return model.to(device).eval(), load_tokenizer(folder), folder


def load_tokenizer(folder: Path):
    """The folder's tokenizer. ``trust_remote_code=False``: the tokenizer needs no code, and
    without it transformers would ask on the terminal whether to run the folder's modeling file;
    its warning that the config is not a stock model type is silenced (that is expected here)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise BppError(f"cannot load the tokenizer saved in {folder}: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` at ``out``; an old ``out`` is moved aside first and removed
    only once the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_recovered(model, tokenizer, source: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
                   report: dict | None = None) -> Path:
    """Save ``model`` to ``out`` the way ``source`` (the folder it was loaded from) is saved:
    safetensors, config (with the same ``auto_map`` and the shipped ``modeling_bpp.py`` when
    ``source`` has them), generation config, tokenizer, ``bpp_compaction.json`` when present,
    and ``report``. Written to a temporary folder and renamed: ``out`` is complete or absent."""
    source, out = Path(source), Path(out)
    if out.exists() and not force:
        raise BppError(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the model folder is not
        model.save_pretrained(tmp, safe_serialization=True)
        if getattr(model.config, "auto_map", None) and (source / MODELING_FILE).is_file():
            shutil.copy2(source / MODELING_FILE, tmp / MODELING_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if (source / "bpp_compaction.json").is_file():
            shutil.copy2(source / "bpp_compaction.json", tmp / "bpp_compaction.json")
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def partial_dir(out: str | os.PathLike) -> Path:
    """Where an unfinished ``bpp recover --out OUT`` keeps its checkpoint: ``OUT.partial``."""
    out = Path(out)
    return out.with_name(f"{out.name}.partial")


RUN_FILE = "run.json"


def run_recover(model_dir: str | os.PathLike, out: str | os.PathLike, config: RecoverConfig | None = None, *,
                data: str = "default", force: bool = False, resume: bool = False, evaluate: bool = True,
                eval_windows: int | None = None, eval_seq_len: int = 128, checkpoint_every: int = 10,
                dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
                progress: bool = True) -> dict:
    """The ``bpp recover`` job; returns the report, also written to ``out/report.json``.

    Checkpoints go to ``OUT.partial/`` (removed once ``out`` is written); ``resume=True``
    continues the run found there, which must have the same settings."""
    from .data import load_text, tokenize
    from .evaluate import perplexity

    t_start = time.perf_counter()
    config = (config or RecoverConfig()).validate()
    if eval_windows is not None and eval_windows < 1:
        raise BppError(f"--eval-windows must be at least 1, got {eval_windows}")
    out = Path(out)
    partial = partial_dir(out)
    run = {"model": str(resolve_model_dir(model_dir).resolve()), "data": data, "dtype": dtype,
           "recover": config.to_dict(), "checkpoint_every": checkpoint_every, "evaluate": evaluate,
           "eval_windows": eval_windows, "eval_seq_len": eval_seq_len}
    if resume:
        if not (partial / RUN_FILE).is_file() or not (partial / CHECKPOINT).is_file():
            done = " (it is finished)" if (out / "report.json").is_file() else ""
            raise BppError(f"nothing to resume: {partial} holds no checkpoint of a run for {out}{done}")
        saved = json.loads((partial / RUN_FILE).read_text())
        diff = [f"{k}: {saved.get(k)!r} (interrupted run) vs {v!r} (now)" for k, v in run.items() if saved.get(k) != v]
        if diff:
            raise BppError("--resume: the interrupted run had other settings: " + "; ".join(diff))
    else:
        if out.exists() and not force:
            raise BppError(f"{out} exists; pass --force to replace it")
        if partial.exists():
            if not force:
                raise BppError(f"{partial} holds an interrupted run for {out}; pass --resume to continue it, "
                               "or --force to start over")
            shutil.rmtree(partial)

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(resolve_model_dir(model_dir))
    train_ids = tokenize(tokenizer, load_text(data, "calib"))
    training_windows(tokenizer, train_ids, config)  # enough text? (before the model loads)
    held = tokenize(tokenizer, load_text(data, "heldout")) if evaluate else None
    model, tokenizer, source = load_pruned(model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    load_seconds = time.perf_counter() - t0
    total_params = sum(p.numel() for p in model.parameters())

    job = LoraRecovery(model, tokenizer, train_ids, config, checkpoint_dir=partial,
                       checkpoint_every=checkpoint_every, progress=progress)  # checks the text is long enough
    if resume:
        job.resume()
    else:
        t0 = time.perf_counter()
        before = None
        if evaluate:
            with torch.no_grad():
                before = perplexity(job.peft_model, tokenizer, held, seq_len=eval_seq_len, max_windows=eval_windows)
        job.extra_state = {"perplexity_before": before, "eval_before_seconds": time.perf_counter() - t0, "run": run}
        partial.mkdir(parents=True, exist_ok=True)
        job.save_checkpoint()  # step 0: a kill during the first steps can resume
        (partial / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")

    job.train()
    t0 = time.perf_counter()
    merged = job.merge()
    merge_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    after = None
    if evaluate:
        with torch.no_grad():
            after = perplexity(merged, tokenizer, held, seq_len=eval_seq_len, max_windows=eval_windows)
    eval_after_seconds = time.perf_counter() - t0

    losses = job.losses
    k = max(1, len(losses) // 10)
    report = {
        "source_model": str(source),
        "config": {"data": data, "dtype": dtype, "device": device, "checkpoint_every": checkpoint_every,
                   **config.to_dict(), "warmup_steps": config.warmup_steps},
        "lora": {"target_modules": job.targets, "trainable_params": job.trainable_params, "model_params": total_params,
                 "merged": True},
        "perplexity": {"data": f"{data}/heldout", "seq_len": eval_seq_len, "max_windows": eval_windows,
                       "before": job.extra_state.get("perplexity_before"), "after": after} if evaluate else None,
        "train_loss": {"first_10pct_mean": sum(losses[:k]) / k, "last_10pct_mean": sum(losses[-k:]) / k},
        "loss_curve": losses,
        "lr_curve": job.lrs,
        "grad_norm_curve": job.grad_norms,
        "sessions": job.sessions,
        "timings_s": {"load_this_session": load_seconds,
                      "eval_before": job.extra_state.get("eval_before_seconds"),
                      "train": job.seconds, "per_step": job.seconds / max(1, len(losses)),
                      "merge": merge_seconds, "eval_after": eval_after_seconds},
    }
    t0 = time.perf_counter()
    report["timings_s"]["save"] = None  # filled in below, after the folder is written
    save_recovered(merged, tokenizer, source, out, force=True, report=report)
    report["timings_s"]["save"] = time.perf_counter() - t0
    report["timings_s"]["total_this_session"] = time.perf_counter() - t_start
    tmp = out / ".report.json.tmp"  # now with the save and total times
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "report.json")
    shutil.rmtree(partial, ignore_errors=True)
    return report
