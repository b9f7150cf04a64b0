"""``bpp recover``: LoRA recovery fine-tuning of a compacted model folder, merged into one dense
model saved the way the input folder is (:mod:`bpp.methods.lora_recovery` does the training).
Checkpoints go to ``OUT.partial/`` until the result is written."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from ..checkpoints import differences
from ..errors import BppError
from ..fileio import atomic_write_json, read_json, write_error
from ..methods.lora_recovery import CHECKPOINT, LoraRecovery
from ..methods.recovery_config import RecoverConfig, recovery_windows
from ..model_folders import save_model_folder
from ..modelio import MODELING_FILE, load_pruned, load_tokenizer, resolve_model_dir
from ..runs import RunFolder, check_model_folder_target, check_target


def save_recovered(model, tokenizer, source: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
                   report: dict | None = None, protected: tuple = ()) -> Path:
    """Save ``model`` to ``out`` the way ``source`` (the folder it was loaded from) is saved:
    safetensors, config (with the same ``auto_map`` and the shipped ``modeling_bpp.py`` when
    ``source`` has them), generation config, tokenizer, ``bpp_compaction.json`` when present,
    and ``report``. Written to a temporary folder and renamed: ``out`` is complete or absent."""
    source = Path(source)
    copies = [source / name for name in ("bpp_compaction.json",) if (source / name).is_file()]
    if getattr(model.config, "auto_map", None) and (source / MODELING_FILE).is_file():
        copies.append(source / MODELING_FILE)
    extra = {"report.json": json.dumps(report, indent=2) + "\n"} if report is not None else None
    return save_model_folder(model, out, tokenizer=tokenizer, force=force, copy_files=copies, extra_files=extra,
                             protected=protected)


def partial_dir(out: str | os.PathLike) -> Path:
    """Where an unfinished ``bpp recover --out OUT`` keeps its checkpoint: ``OUT.partial``."""
    out = Path(out)
    return out.with_name(f"{out.name}.partial")


RUN_FILE = "run.json"


# options of a run besides the training configuration, with their defaults
RUN_DEFAULTS = {"data": "default", "dtype": "float32", "checkpoint_every": 10, "evaluate": True,
                "eval_windows": None, "eval_seq_len": 128}
CONFIG_FIELDS = tuple(RecoverConfig.__dataclass_fields__)
# options that do not change the weights: given again on resume, they replace the saved ones
CHANGEABLE_ON_RESUME = ("checkpoint_every", "evaluate", "eval_windows", "eval_seq_len")


def _resolve_run(model_dir, config: RecoverConfig | None, options: dict, saved: dict | None) -> dict:
    """The run's settings: ``{"model", "recover": config dict, **RUN_DEFAULTS keys}``; when resuming,
    the ``saved`` ones, which the given model, config and options must not contradict."""
    unknown = sorted(set(options) - set(RUN_DEFAULTS) - set(CONFIG_FIELDS))
    if unknown:
        known = sorted((*RUN_DEFAULTS, *CONFIG_FIELDS))
        raise BppError(f"unknown recover option(s) {', '.join(unknown)}; known: {', '.join(known)}")
    config_options = {k: v for k, v in options.items() if k in CONFIG_FIELDS}
    run_options = {k: v for k, v in options.items() if k in RUN_DEFAULTS}
    if config is not None and config_options:
        raise BppError("give either a RecoverConfig or its options, not both")
    if saved is None:
        if model_dir is None:
            raise BppError("give the pruned model folder with --model DIR")
        config = (config or RecoverConfig(**config_options)).validate()
        return {"model": str(resolve_model_dir(model_dir).resolve()), **RUN_DEFAULTS, **run_options,
                "recover": config.to_dict()}
    changeable = {k: v for k, v in run_options.items() if k in CHANGEABLE_ON_RESUME}
    asked = {k: v for k, v in run_options.items() if k not in CHANGEABLE_ON_RESUME}
    if model_dir is not None:
        asked["model"] = str(resolve_model_dir(model_dir).resolve())
    saved_config = saved["recover"]
    given_config = config.validate().to_dict() if config is not None else \
        RecoverConfig.from_dict({**saved_config, **config_options}).to_dict()
    diff = differences(saved, asked, "interrupted run") + differences(saved_config, given_config, "interrupted run")
    if diff:
        raise BppError("--resume continues the interrupted run as it was configured; these options differ from it: "
                       + "; ".join(diff) + " (drop them, or start over with --force)")
    return {**saved, **changeable}


def recover(model_dir: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
            config: RecoverConfig | None = None, *, force: bool = False, resume: bool = False, device: str = "cpu",
            trust_remote_code: bool = False, progress: bool = True, **options) -> dict:
    """The ``bpp recover`` job; returns the report, also written to ``out/report.json``.

    Configured by ``config`` or by keyword ``options``: the fields of :class:`RecoverConfig`
    (steps, rank, lr, ...) and ``data``, ``dtype``, ``checkpoint_every``, ``evaluate``,
    ``eval_windows``, ``eval_seq_len``. Checkpoints go to ``OUT.partial/`` (removed once ``out`` is
    written); ``resume=True`` continues the run found there with its saved settings (options
    given must agree with them)."""

    t_start = time.perf_counter()
    if out is None:
        raise BppError("give the output folder with --out DIR")
    out = Path(out)
    check_target(out)  # not the current folder, nor one above it (`.` and `/` have no name to extend)
    partial = RunFolder(partial_dir(out), "recover")
    if resume and not (partial.path / CHECKPOINT).is_file():
        done = " (it is finished)" if (out / "report.json").is_file() else ""
        raise BppError(f"nothing to resume: {partial.path} holds no checkpoint of a run for {out}{done}")
    if not resume and partial.path.exists() and not force:
        raise BppError(f"{partial.path} holds an interrupted run for {out}; pass --resume to continue it, "
                       "or --force to start over")
    local = tuple(Path(p) for p in (model_dir, options.get("data")) if isinstance(p, (str, os.PathLike))
                  and Path(p).exists())
    check_model_folder_target(out, force=force, protected=local)
    partial.open(force=force, resume=resume, protected=local)
    ok = False
    try:
        report = _run(model_dir, out, partial, config, options, force=force, resume=resume, device=device,
                      trust_remote_code=trust_remote_code, progress=progress, t_start=t_start, local=local)
        ok = True
        return report
    except OSError as e:
        raise BppError(f"{write_error(e, out)}; the last checkpoint in {partial.path} is kept: once that is fixed, "
                       f"continue with bpp recover --out {out} --resume") from None
    finally:
        partial.close(ok)
        if ok:
            shutil.rmtree(partial.path, ignore_errors=True)


def _run(model_dir, out: Path, partial: RunFolder, config, options: dict, *, force: bool, resume: bool, device: str,
         trust_remote_code: bool, progress: bool, t_start: float, local: tuple) -> dict:
    from ..data import load_text, tokenize
    from ..evaluation import perplexity

    saved = read_json(partial.path / RUN_FILE, "the run settings") if resume else None
    run = _resolve_run(model_dir, config, options, saved)
    config = RecoverConfig.from_dict(run["recover"]).validate()
    model_dir, data, dtype, evaluate = run["model"], run["data"], run["dtype"], run["evaluate"]
    eval_windows, eval_seq_len, checkpoint_every = run["eval_windows"], run["eval_seq_len"], run["checkpoint_every"]
    if eval_windows is not None and eval_windows < 1:
        raise BppError(f"--eval-windows must be at least 1, got {eval_windows}")

    # every input loads and is checked before the folders are touched
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(resolve_model_dir(model_dir))
    train_ids = tokenize(tokenizer, load_text(data, "calib"))
    recovery_windows(tokenizer, train_ids, config)  # enough text? (before the model loads)
    held = tokenize(tokenizer, load_text(data, "heldout")) if evaluate else None
    model, tokenizer, source = load_pruned(model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    load_seconds = time.perf_counter() - t0
    total_params = sum(p.numel() for p in model.parameters())
    partial.claim(force=force, resume=resume, files=(CHECKPOINT, RUN_FILE))

    job = LoraRecovery(model, tokenizer, train_ids, config, checkpoint_dir=partial.path,
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
        job.save_checkpoint()  # step 0: a kill during the first steps can resume
        atomic_write_json(partial.path / RUN_FILE, run)

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
    save_recovered(merged, tokenizer, source, out, force=True, report=report, protected=local)
    report["timings_s"]["save"] = time.perf_counter() - t0
    report["timings_s"]["total_this_session"] = time.perf_counter() - t_start
    atomic_write_json(out / "report.json", report)  # now with the save and total times
    return report
