"""``bpp prune``: learn a structured mask by policy gradient and write the pruned result (mask,
θ or the allocation, metrics, report, plots, the compacted model) into a run folder that can be
resumed. The job runs either policy's loop (:mod:`bpp.policy_gradient`, :mod:`bpp.allocation_loop`):
it computes what the loops need from :mod:`bpp.methods` (the init, the within-layer ranking, the
calibration statistics of the bias compensation) and hands it down."""
from __future__ import annotations

import errno
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..allocation_loop import AllocationLoop, allocation_file, new_loop, policy_record, resumed_loop
from ..compensation import FILE as COMPENSATION_FILE
from ..compensation import BiasCompensation, InputStats
from ..errors import BppError
from ..evaluate import masked_perplexity, perplexity
from ..incumbent import Incumbent
from ..policy import Policy, param_summary
from ..policy_gradient import (LossesFn, MaskLosses, PolicyGradientLoop, PruneConfig, calibration_batches, mask_losses,
                               needs_stats, selection_windows)
from ..runs import (CHECKPOINT, RunFolder, atomic_write_json, atomic_write_text, load_checkpoint,
                    malformed_checkpoint, read_jsonl, write_error)
from ..space import Masks, MaskSpace, model_fingerprint

OUTPUT_FILES = ("mask.safetensors", "theta.safetensors", "init_mask.safetensors", "metrics.jsonl", "report.json",
                "config.json", "kept_per_layer.png", "loss_curve.png", CHECKPOINT, "model", "model.gguf",
                "allocation.json", COMPENSATION_FILE, "deterministic_mask.safetensors")
OUTPUT_PATTERNS = (r"snapshot_\d+\.safetensors",)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of steps at or after ``step`` (they are re-run after a resume), and a last
    line an earlier session left half-written."""
    if not path.is_file():
        return
    records = read_jsonl(path, "the metrics")
    if not all(isinstance(r.get("step"), int) for r in records):
        raise BppError(f"{path} holds a record without a step number: the file is corrupt; remove it or start "
                       "a new run")
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records if r["step"] < step))


def run_checkpoint(out: Path) -> dict:
    """The checkpoint of the run in ``out``, or a clear error."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        raise BppError(f"{out} has no {CHECKPOINT} to resume from; start a new run with --out (and --force)")
    return load_checkpoint(path)


def default_out(config: PruneConfig) -> Path:
    """``pruned-<model name>-<sparsity>``: where a run goes when no folder is given."""
    name = Path(config.model).name if config.model != "default" else "default"
    return Path(f"pruned-{name}-{config.sparsity:g}")


def resolve_config(config: PruneConfig | None, options: dict, saved: dict | None = None) -> PruneConfig:
    """The configuration of a run: ``config``, or ``options`` (PruneConfig fields) over the
    defaults; when resuming, the ``saved`` one, which ``config`` or ``options`` must not contradict."""
    known = set(PruneConfig.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise BppError(f"unknown prune option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if config is not None and options:
        raise BppError("give either a PruneConfig or options, not both")
    if saved is None:
        return (config or PruneConfig(**options)).validate()
    saved = PruneConfig.from_dict(saved)
    asked = config.to_dict() if config is not None else options
    diff = [f"--{k.replace('_', '-')}: {v!r} given, the run has {getattr(saved, k)!r}"
            for k, v in asked.items() if getattr(saved, k) != v]
    if diff:
        raise BppError(f"--resume continues the run as it was configured; these options differ "
                       f"from it: {'; '.join(diff)} (drop them, or start a new run with --out)")
    return saved.validate()


# options of the job that do not change the mask; a resumed run keeps its own unless given again
JOB_DEFAULTS = {"checkpoint_every": 20, "eval_windows": None, "eval_seq_len": 128, "evaluate": True,
                "export": None, "export_dtype": "f32"}
EXPORT_FORMATS = ("gguf",)
_UNSET = object()


def _local_inputs(config: PruneConfig) -> tuple:
    """Local files and folders the run reads, which its output folder must not hold."""
    return tuple(Path(p) for p in (config.model, config.data) if p not in ("default",) and Path(p).exists())


def prune(config: PruneConfig | None = None, out: str | os.PathLike | None = None, *, force: bool = False,
          resume: bool = False, checkpoint_every=_UNSET, eval_windows=_UNSET, eval_seq_len=_UNSET, evaluate=_UNSET,
          export=_UNSET, export_dtype=_UNSET, progress: bool = True, model=None, tokenizer=None, losses_fn: LossesFn | None = None,
          compact: bool = True, snapshots: tuple[int, ...] = (), **options) -> dict:
    """The ``bpp prune`` job: returns the report (also written to ``out/report.json``).

    The run is configured by ``config`` or by keyword ``options`` (the fields of
    :class:`PruneConfig`, e.g. ``sparsity=0.3, steps=50``); ``out`` defaults to
    ``pruned-<model>-<sparsity>``. ``resume=True`` continues the run in ``out`` with its saved
    configuration (options given must agree with it) and its saved ``checkpoint_every`` and
    evaluation options (those given again replace them, and the report says so). ``export="gguf"``
    also writes ``out/model.gguf`` for llama.cpp (``export_dtype`` f32 | f16 | bf16 | q8_0). ``model`` is a
    folder / hub id / "default" (the config's ``model``), or a loaded model passed with its
    ``tokenizer`` (benchmarks reuse one); ``losses_fn`` replaces the default batched engine
    (with ``objective="nll"`` and ``bias_compensation=False``); ``snapshots``: numbers of evaluated
    masks at which the deterministic mask is saved as ``snapshot_<n>.safetensors`` (not resumed;
    for the sample-efficiency benchmark).

    The output folder follows :mod:`bpp.runs`: one writer at a time, ``force`` replaces only the
    files an earlier bpp prune run wrote there, and nothing is removed before the model and the
    text have loaded."""
    from ..distributed import ShardedLosses, setup

    given = {k: v for k, v in dict(checkpoint_every=checkpoint_every, eval_windows=eval_windows,
                                   eval_seq_len=eval_seq_len, evaluate=evaluate, export=export,
                                   export_dtype=export_dtype).items() if v is not _UNSET}
    if model is None or isinstance(model, (str, os.PathLike)):
        if model is not None:
            options["model"] = str(model)
        model = None
    elif config is None and "model" not in options:  # a loaded model: the config names where it came from
        options["model"] = str(getattr(model.config, "_name_or_path", "") or "in-memory model")
    if resume and out is None:
        raise BppError("resuming needs the run folder (--resume DIR)")
    out = Path(out) if out is not None else None
    if resume:
        if (out / "report.json").is_file():
            raise BppError(f"{out} holds a finished run (report.json exists); nothing to resume")
        state = run_checkpoint(out)
        with malformed_checkpoint(out / CHECKPOINT):
            config = resolve_config(config, options, state["config"])
    else:
        state = None
        config = resolve_config(config, options)
    out = out if out is not None else default_out(config)
    rank, world_size = setup(config.device)
    writer = rank == 0  # rank 0 alone writes; every rank computes the same θ
    folder = RunFolder(out, "prune")
    if writer:
        folder.open(force=force, resume=resume, protected=_local_inputs(config))
    ok = False
    try:
        if resume:
            state = run_checkpoint(out)  # again, under the lock
        report = _run(config, out, folder if writer else None, state, given, rank=rank, world_size=world_size,
                      force=force, progress=progress, model=model, tokenizer=tokenizer, losses_fn=losses_fn,
                      compact=compact, sharded=ShardedLosses, snapshots=snapshots)
        ok = True
        return report
    except OSError as e:
        fix = "free space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"
        raise BppError(f"{write_error(e, out)}; what was written is kept: {fix}, then continue with "
                       f"bpp prune --resume {out}") from None
    finally:
        if writer:
            folder.close(ok)


def _run(config: PruneConfig, out: Path, folder: RunFolder | None, state: dict | None, given: dict, *, rank: int,
         world_size: int, force: bool, progress: bool, model, tokenizer, losses_fn, compact: bool, sharded,
         snapshots: tuple[int, ...] = ()) -> dict:
    from ..data import load_text, tokenize
    from ..methods import initialise, method
    from ..modelio import load_model

    t_start = time.perf_counter()
    writer = folder is not None
    with malformed_checkpoint(out / CHECKPOINT):
        saved_job = (state or {}).get("extra", {}).get("job", {})
        job = {**JOB_DEFAULTS, **saved_job, **given}
    if job["eval_windows"] is not None and job["eval_windows"] < 1:
        raise BppError(f"--eval-windows must be at least 1, got {job['eval_windows']}")
    if job["checkpoint_every"] < 0:
        raise BppError(f"--checkpoint-every must be at least 0, got {job['checkpoint_every']}")
    if job["export"] is not None:
        from .export import DTYPES

        if job["export"] not in EXPORT_FORMATS:
            raise BppError(f"unknown export format {job['export']!r}; bpp exports {', '.join(EXPORT_FORMATS)}")
        if job["export_dtype"] not in DTYPES:
            raise BppError(f"unknown GGUF dtype {job['export_dtype']!r}; use one of {', '.join(DTYPES)}")
        if not compact:
            raise BppError("exporting needs the compacted model; do not turn compaction off")
    changed = {k: v for k, v in given.items() if k in saved_job and saved_job[k] != v}
    method(config.init, "init")

    # every input loads and is checked before the folder is touched
    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = load_model(None if config.model == "default" else config.model,
                                      dtype=config.dtype, device=config.device, device_map=config.device_map)
    space = MaskSpace.from_model(model)
    calib_ids = tokenize(tokenizer, load_text(config.data, "calib"))
    windows = calibration_batches(calib_ids, config)  # enough text?
    selection_ids = selection_windows(calib_ids, config)  # held-in windows the gradient never sees
    held = tokenize(tokenizer, load_text(config.data, "heldout")) if job["evaluate"] else None
    policy = Policy(space, config.granularity, config.sparsity, config.budget)
    losses, backend = mask_losses(model, config, losses_fn)
    step_losses = losses
    if world_size > 1:
        step_losses = sharded(losses, rank, world_size)
        backend = f"{backend} sharded over {world_size} ranks"
    load_seconds = time.perf_counter() - t0
    fingerprint = model_fingerprint(model)

    if writer:
        folder.claim(force=force, resume=state is not None, files=OUTPUT_FILES, patterns=OUTPUT_PATTERNS)
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # the folder is ready (or the writer failed) before anyone goes on

    loop_args = (step_losses, windows, config, out if writer else None, job["checkpoint_every"], progress and writer)
    if state is not None:
        with malformed_checkpoint(out / CHECKPOINT):
            loop = resumed_loop(policy, state, loop_args)
            loop.load_state_dict(state)
        init_mask = Masks.load(out / "init_mask.safetensors") if (out / "init_mask.safetensors").is_file() else None
        saved = loop.extra_state.get("compensation")
        if saved is not None:  # the very means the run's masks were judged with
            losses.compensation = BiasCompensation(model, saved["attn_means"], saved["mlp_means"])
        if writer:
            _truncate_metrics(out / "metrics.jsonl", loop.step)
        loop.extra_state["sessions"] = loop.extra_state.get("sessions", 1) + 1
        loop.extra_state["job"] = job
        if changed:
            loop.extra_state.setdefault("job_changes", []).append({"session": loop.extra_state["sessions"],
                                                                   **changed})
    else:
        if writer:
            atomic_write_json(out / "config.json", config.to_dict())
        t0 = time.perf_counter()
        init_calib = None
        if method(config.init, "init").calibrated or needs_stats(config):
            from ..data import windows as random_windows

            init_calib = random_windows(tokenizer, calib_ids, config.init_seq_len, config.init_windows, seed=config.seed)
        with torch.no_grad():
            _, init_mask, metrics = initialise(policy, config.init, model, init_calib)
            stats = InputStats(model).collect(init_calib) if needs_stats(config) else None
            if config.bias_compensation:
                losses.compensation = BiasCompensation.from_stats(model, stats)
            loop = new_loop(space, policy, config, init_mask, metrics,
                            rank_scores(model, space, config, metrics, stats, init_calib), loop_args)
        if init_mask is not None and writer:
            init_mask.save(out / "init_mask.safetensors", model=fingerprint)
        if losses.compensation is not None:
            loop.extra_state["compensation"] = losses.compensation.state()
        loop.extra_state.update({"init_seconds": time.perf_counter() - t0, "sessions": 1, "job": job})
    loop.window_losses = losses.per_window  # allocation's group steps judge moves window by window
    if writer:
        attach_incumbent(loop, losses, selection_ids, init_mask)
        if state is None:
            if losses.compensation is not None:
                losses.compensation.save(out / COMPENSATION_FILE)  # `bpp compact --bias-compensation` reads it
            loop.save_checkpoint()  # step 0: a kill during the first steps can still resume
    loop.snapshots = sorted(n for n in snapshots if n > loop.evaluated)
    if writer and loop.snapshots:
        folder.record(*(f"snapshot_{n}.safetensors" for n in loop.snapshots))

    with torch.no_grad():
        loop.run()
    if not writer:  # outputs and evaluation are rank 0's
        return {"rank": rank, "world_size": world_size, "steps_done": loop.step}
    loop.save_checkpoint()  # the final state, so a kill during evaluation can resume straight to it
    deterministic = loop.deterministic_mask()
    final_mask = loop.incumbent.mask if loop.incumbent is not None else deterministic
    final_mask.save(out / "mask.safetensors", model=fingerprint)
    if isinstance(loop, AllocationLoop):
        atomic_write_json(out / "allocation.json", allocation_file(loop))
    else:
        policy.theta_masks().save(out / "theta.safetensors", model=fingerprint)
    if not same_mask(deterministic, final_mask):
        deterministic.save(out / "deterministic_mask.safetensors", model=fingerprint)
    compensation = losses.compensation
    biases = (lambda mask: compensation.compact_biases(mask)) if compensation is not None else (lambda mask: {})

    t0 = time.perf_counter()
    perplexities = {}
    eval_seq_len, eval_windows = job["eval_seq_len"], job["eval_windows"]
    if job["evaluate"]:
        with torch.no_grad():
            ppl = lambda mask: compacted_perplexity(model, tokenizer, held, mask, biases(mask), eval_seq_len,  # noqa: E731
                                                    eval_windows)
            perplexities["dense"] = masked_perplexity(model, tokenizer, held, None, eval_seq_len, eval_windows)
            if init_mask is not None:
                perplexities["init_mask"] = ppl(init_mask)
            perplexities["final_mask"] = ppl(final_mask)
            if not same_mask(deterministic, final_mask):
                perplexities["deterministic_mask"] = ppl(deterministic)
    eval_seconds = time.perf_counter() - t0

    report = {
        "config": config.to_dict(),
        "out": str(out),
        "job": job,
        "job_changes_on_resume": loop.extra_state.get("job_changes", []),
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
                       "bias_compensation": compensation is not None, **perplexities},
        **policy_record(loop),
        **incumbent_record(loop.incumbent),
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
        report["compacted_model"] = _save_compacted(model, tokenizer, final_mask, out / "model", biases(final_mask))
        if job["export"] == "gguf":
            report["export"] = _export(out / "model", out / "model.gguf", job["export_dtype"], progress)
    report["timings_s"]["total_this_session"] = time.perf_counter() - t_start
    atomic_write_json(out / "report.json", report)
    return report


def rank_scores(model, space: MaskSpace, config: PruneConfig, metrics: dict, stats: InputStats | None,
                calib: torch.Tensor | None) -> dict | None:
    """The scores that rank units inside each layer for the allocation policy (``--rank``):
    ``{"channel": (L, m), "group": (L, G)}``, or None when the init's own metrics rank them or
    the policy is per unit."""
    if config.policy != "allocation" or config.rank == "init":
        return None
    if config.rank == "flap":
        from ..methods.flap import flap_scores

        return dict(zip(("channel", "group"), flap_scores(model, stats)))
    if config.init == "wanda-sp":
        return metrics
    from ..methods.wanda_sp import wanda_sp_metric

    scores, _ = wanda_sp_metric(model, space, calib, 1.0 - config.sparsity, ("channel", "group"))
    return scores


def attach_incumbent(loop: PolicyGradientLoop, losses: MaskLosses, selection_ids: torch.Tensor | None,
                     init_mask: Masks | None) -> None:
    """Give the loop its judge and, in a fresh run, its first incumbent: the init mask (or the
    policy's starting deterministic mask when the init has none)."""
    if selection_ids is None:
        return
    loop.selection_losses, loop.selection_ids = losses.per_window, selection_ids
    if loop.incumbent is None:
        first = init_mask if init_mask is not None else loop.deterministic_mask()
        with torch.no_grad():
            loop.incumbent = Incumbent(first, losses.per_window(selection_ids, first)[0], step=loop.step)


def incumbent_record(inc: Incumbent | None) -> dict:
    if inc is None:
        return {}
    return {"incumbent": {"last_changed_at_step": inc.changed_at, "selection_loss": inc.loss,
                          "selection_windows": int(inc.window_losses.numel()), "challenges": len(inc.history),
                          "accepted": sum(h["accepted"] for h in inc.history), "history": inc.history}}


def same_mask(a: Masks, b: Masks) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("channels", "groups", "layers"))


def compacted_perplexity(model, tokenizer, held: torch.Tensor, mask: Masks, biases: dict, seq_len: int,
                         max_windows: int | None) -> float:
    """Held-out perplexity of the model ``bpp prune`` writes for ``mask``: compacted with its
    compensation ``biases`` when there are any, else the mask applied by hooks (the same logits)."""
    if not biases:
        return masked_perplexity(model, tokenizer, held, mask, seq_len, max_windows)
    from ..compaction import compact_model

    return perplexity(compact_model(model, mask, **biases), tokenizer, held, seq_len=seq_len, max_windows=max_windows)


def _save_compacted(model, tokenizer, mask: Masks, path: Path, biases: dict | None = None) -> dict:
    """Compact and save the pruned model (with its compensation ``biases``, when on). A failure
    there does not lose the run: mask and θ are already saved, and the report says why."""
    from ..compaction import save_compacted

    try:
        saved = save_compacted(model, mask, path, tokenizer=tokenizer, force=True, **(biases or {}))
    except (BppError, OSError) as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # a full disk: the rest of the run cannot be written either; free space, then --resume
        warnings.warn(f"compaction failed: {e}; the mask is saved, run `bpp compact` on it later", stacklevel=2)
        return {"path": None, "error": str(e)}
    return {"path": str(saved)}


def _export(folder: Path, path: Path, dtype: str, progress: bool) -> dict:
    """The compacted model as GGUF. A failure does not lose the run: the model folder is saved,
    and the report says why (``bpp export`` can be run on it later)."""
    from .export import export_gguf

    if not (folder / "config.json").is_file():
        return {"path": None, "error": "no compacted model to export"}
    try:
        export_gguf(folder, path, dtype=dtype, force=True, progress=progress)
    except BppError as e:
        warnings.warn(f"GGUF export failed: {e}; the compacted model is saved in {folder}", stacklevel=2)
        return {"path": None, "error": str(e)}
    return {"path": str(path), "format": "gguf", "dtype": dtype}


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

    records = read_jsonl(metrics_path, "the metrics") if metrics_path.is_file() else []
    steps = [r["step"] for r in records if r.get("mean_loss") is not None]
    checks = [r for r in records if r.get("selection")]
    fig, axes = plt.subplots(2 if checks else 1, 1, figsize=(7, 5.6 if checks else 3.6), sharex=True, squeeze=False)
    ax = axes[0, 0]
    if steps:
        ax.plot(steps, [r["mean_loss"] for r in records if r.get("mean_loss") is not None], lw=0.8,
                alpha=0.6, label="mean loss of the step's masks")
        if any(r.get("baseline") is not None for r in records):
            ax.plot(steps, [r.get("baseline") for r in records if r.get("mean_loss") is not None], lw=1.5,
                    label="baseline")
    ax.set_ylabel("loss on the step's batch")
    if checks:  # issue 18: is PG learning or drifting? the deterministic mask on held-in windows
        held = axes[1, 0]
        x = [r["step"] + 1 for r in checks]
        held.plot(x, [r["selection"]["challenger_loss"] for r in checks], "o-", ms=3, lw=1.2,
                  label="deterministic mask")
        best = [r["selection"]["challenger_loss"] if r["selection"]["accepted"] else r["selection"]["incumbent_loss"]
                for r in checks]
        held.step([0] + x, [checks[0]["selection"]["incumbent_loss"]] + best, "k--", where="post", lw=1,
                  label="incumbent (the output)")
        held.set_ylabel("held-in windows' loss")
        held.grid(alpha=0.3)
        held.legend()
    axes[-1, 0].set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
