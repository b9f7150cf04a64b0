"""Recovery fine-tuning of a pruned model: LoRA adapters trained on calibration text, then merged
back into the weights, so the result is a plain dense model of the same (compacted) architecture.

LLM-Pruner, FLAP and the policy-gradient paper recover a pruned model with LoRA (rank 8, alpha
16) on the q/k/v/o and gate/up/down projections; bpp does the same with ``peft``: the base
weights stay frozen, AdamW updates the adapters only, the loss is next-token cross-entropy on
random calibration windows (:func:`bpp.data.windows`), the learning rate warms up linearly
and then follows a cosine (or linear, or constant) schedule; ``merge_and_unload`` folds each
adapter ``(alpha / rank) · B A`` into its weight.

Each step's forward and backward runs through bpp_kernels' masked ops (engine "kernels", every unit
kept): the blocks use the adapted weights W + (alpha / rank)·B·A, packed anew each step (packing is
differentiable, so the gradients reach A and B), and the LM head is fused with the cross-entropy,
so the ``(batch · seq_len, vocab)`` logits are never built and the ops keep only their inputs for
the backward. Where the ops cannot compute what the Hugging Face modules do (LoRA dropout, which
acts on the adapters' inputs only; a LoRA target outside the block projections; a model feature
:func:`bpp.models.blocks.kernel_blocks_unsupported` names), ``engine="auto"`` trains through
the Hugging Face forward of the peft model ("hf"). Both give the same loss curve within
fp32 rounding (tests/test_recover.py); the merge and the saved folder are the same either way.

Resumable: every ``checkpoint_every`` steps (and at the end of training) the adapters, the
optimiser and scheduler states, the run's RNG state, the step and the loss curve are written
atomically to ``checkpoint_dir/checkpoint.pt``; a resumed run reproduces an uninterrupted one
(the step is the data cursor: the windows are drawn once from the seed, batch k is rows
``k·B … (k+1)·B``). The run draws its random numbers (LoRA dropout) from its own seeded torch
RNG stream, swapped in while it trains, so the caller's global RNG is neither used nor changed.

The ``bpp recover`` job around it (load a compacted folder, fine-tune, save a folder that loads
exactly like the input) is :func:`bpp.jobs.recover.recover`.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch

from ..checkpoints import CHECKPOINT, fingerprint, load_checkpoint, save_checkpoint
from ..data import window_bos
from ..errors import BppError
from ..models.blocks import choose_engine, kernel_lm_loss, lora_weight
from .recovery_config import TARGET_MODULES, RecoverConfig, lr_factor, present_targets, recovery_windows


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
        self.windows = recovery_windows(tokenizer, train_ids, self.config, window_bos(model))
        targets = present_targets(model, self.config.target_modules)
        if not targets:
            raise BppError(f"the model has none of the LoRA target modules {', '.join(self.config.target_modules)}")
        self.targets = targets
        self.signature = _model_signature(model)
        self.was_training = model.training
        self.device = next(model.parameters()).device
        others = sorted(set(targets) - set(TARGET_MODULES))
        reason = ("LoRA dropout acts on the adapters' inputs only, not on the merged weight" if self.config.dropout > 0
                  else f"LoRA targets outside the block projections ({', '.join(others)})" if others else None)
        self.engine, self.engine_reason = choose_engine(self.config.engine, model, self.config.seq_len, "recovery",
                                                        training=True, lm_head=True, reason=reason)
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
        if self.engine == "kernels":
            loss = kernel_lm_loss(self.peft_model.get_base_model(), batch, lora_weight)
        else:
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
            "data": {"cursor": self.step * self.config.batch_size, "windows": fingerprint(self.windows)},
            "model": self.signature,
            "targets": self.targets,
            "curves": {"loss": list(self.losses), "lr": list(self.lrs), "grad_norm": list(self.grad_norms)},
            "seconds": self.seconds,
            "sessions": self.sessions,
            "extra": self.extra_state,
        }

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        return save_checkpoint(self.state_dict(), Path(path) if path else self.checkpoint_dir / CHECKPOINT)

    def load_state_dict(self, state: dict) -> None:
        from peft import set_peft_model_state_dict

        diff = RecoverConfig.from_dict(state["config"]).differences(self.config)
        if diff:
            raise BppError("the checkpoint was made with a different configuration: " + "; ".join(diff))
        if state["model"] != self.signature:
            raise BppError("the checkpoint was made for a different model (its weights or shapes differ)")
        if state["data"]["windows"] != fingerprint(self.windows):
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
        self.load_state_dict(load_checkpoint(path))
        return True

    def log(self) -> dict:
        return {"config": self.config.to_dict(), "target_modules": self.targets,
                "trainable_params": self.trainable_params, "steps_done": self.step, "sessions": self.sessions,
                "loss": list(self.losses), "lr": list(self.lrs), "grad_norm": list(self.grad_norms),
                "engine": self.engine, "engine_fallback_reason": self.engine_reason,
                "train_seconds": self.seconds, "seconds_per_step": self.seconds / max(1, len(self.losses))}


def lora_recover(model, tokenizer, train_ids, *, steps: int = 50, rank: int = 8, alpha: float = 16.0,
            lr: float = 5e-4, batch_size: int = 4, seq_len: int = 128, schedule: str = "cosine",
            warmup: float = 0.1, dropout: float = 0.0, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
            target_modules=TARGET_MODULES, seed: int = 0, engine: str = "auto", progress: bool = True,
            checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 10, resume: bool = False,
            on_step: Callable[[dict], None] | None = None, extra_state: dict | None = None):
    """LoRA-fine-tune ``model`` on next-token prediction over ``train_ids`` (1-D token ids, or
    text) and merge the adapters: ``(merged_model, log)``. The merged model is ``model`` itself,
    its target weights updated in place (pass a copy to keep the original); everything else in it
    is untouched. ``log`` holds the configuration, the per-step loss / learning rate / gradient
    norm, the trainable parameter count, the engine that ran the steps (``engine``: "kernels" or
    "hf", see :class:`RecoverConfig`; ``engine_fallback_reason`` says why "auto" chose "hf") and
    timings.

    ``checkpoint_dir``: where ``checkpoint.pt`` goes every ``checkpoint_every`` steps; with
    ``resume=True`` a checkpoint there is continued (same config, model and text, or a BppError).
    ``on_step(record)`` is called after each step (and its checkpoint). Works under
    ``torch.no_grad()``."""
    config = RecoverConfig(steps=steps, rank=rank, alpha=alpha, dropout=dropout, lr=lr, batch_size=batch_size,
                           seq_len=seq_len, schedule=schedule, warmup=warmup, weight_decay=weight_decay,
                           max_grad_norm=max_grad_norm, seed=seed, target_modules=tuple(target_modules), engine=engine)
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
