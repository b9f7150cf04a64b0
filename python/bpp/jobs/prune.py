"""``bpp prune``: learn a structured mask by a policy-gradient search and write the pruned result
(mask, the policy's state, metrics, report, plots, the compacted model) into a run folder that
can be resumed. The job reads as its steps (:mod:`bpp.jobs.prune_steps`): load → calibrate →
init → search → write the masks → refit and evaluate them → report → compact; the search itself
is :mod:`bpp.search`, the methods that start it are :mod:`bpp.methods`."""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import torch

from ..bias_compensation import FILE as COMPENSATION_FILE
from ..checkpoints import CHECKPOINT, load_checkpoint, malformed_checkpoint
from ..errors import BppError
from ..fileio import atomic_write_json, write_error
from ..embedded import EMBEDDED_MODELS
from ..plots import plot_kept_per_layer, plot_loss_curve
from ..runs import RunFolder
from ..search import POLICIES, PruneConfig
from ..search.config import default_out, resolve_config
from ..search.objective import LossesFn
from .prune_steps import (build_report, check_resumed_model, chosen_init, evaluate_masks, export_model, job_options,
                          load_inputs, resume_search, save_compacted_model, start_search, write_masks)
from .written import OutputCompensation

OUTPUT_FILES = ("mask.safetensors", "init_mask.safetensors", "metrics.jsonl", "report.json", "config.json",
                "kept_per_layer.png", "loss_curve.png", CHECKPOINT, "model", "model.gguf", COMPENSATION_FILE,
                "deterministic_mask.safetensors", *(name for policy in POLICIES.values() for name in policy.files))
OUTPUT_PATTERNS = (r"snapshot_\d+\.safetensors",)


def run_checkpoint(out: Path) -> dict:
    """The checkpoint of the run in ``out``, or a clear error."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        raise BppError(f"{out} has no {CHECKPOINT} to resume from; start a new run with --out (and --force)")
    return load_checkpoint(path)


_UNSET = object()


def _local_inputs(config: PruneConfig) -> tuple:
    """Local files and folders the run reads, which its output folder must not hold."""
    return tuple(Path(p) for p in (config.model, config.data)
                 if p != "default" and p not in EMBEDDED_MODELS and Path(p).exists())


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
    t_start = time.perf_counter()
    writer = folder is not None
    with malformed_checkpoint(out / CHECKPOINT):
        job, changed = job_options(state, given, compact)
    inputs = load_inputs(config, job, model, tokenizer, losses_fn, rank, world_size, sharded)
    if job["export"] == "gguf" and inputs.space.family == "gemma3_text":
        from ..gguf.gemma3 import WHAT_WORKS

        raise BppError(f"--export gguf: bpp prune learns per-layer sizes and writes refit output biases, which "
                       f"llama.cpp's gemma3 cannot run; {WHAT_WORKS}: prune without --export")
    if state is not None:
        with malformed_checkpoint(out / CHECKPOINT):
            check_resumed_model(state, config, inputs.fingerprint)
    if writer:
        folder.claim(force=force, resume=state is not None, files=OUTPUT_FILES, patterns=OUTPUT_PATTERNS)
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # the folder is ready (or the writer failed) before anyone goes on
    loop_args = (inputs.step_losses, inputs.windows, config, out if writer else None, job["checkpoint_every"],
                 progress and writer)
    compensation = OutputCompensation(config, inputs, progress and writer)  # writes the starts and the output
    if state is not None:
        loop, init_mask = resume_search(config, out, inputs, state, loop_args, job, changed, writer)
    else:
        loop, init_mask = start_search(config, out, inputs, loop_args, job, writer, progress and writer, compensation)
    if writer:
        loop.attach_incumbent(inputs.losses.per_window, inputs.selection_ids, init_mask)
        if state is None:
            if inputs.losses.compensation is not None:
                inputs.losses.compensation.save(out / COMPENSATION_FILE)  # `bpp compact --bias-compensation` reads it
            loop.save_checkpoint()  # step 0: a kill during the first steps can still resume
    loop.snapshots = sorted(n for n in snapshots if n > loop.evaluations)
    if writer and loop.snapshots:
        folder.record(*(f"snapshot_{n}.safetensors" for n in loop.snapshots))

    with torch.no_grad():
        loop.run()
    if not writer:  # outputs and evaluation are rank 0's
        return {"rank": rank, "world_size": world_size, "steps_done": loop.step}
    loop.save_checkpoint()  # the final state, so a kill during evaluation can resume straight to it
    final_mask, _ = write_masks(loop, out, inputs.fingerprint)
    t0, refit_before = time.perf_counter(), compensation.seconds
    perplexities = {}
    if job["evaluate"]:
        perplexities = evaluate_masks(inputs, job, init_mask, final_mask, compensation)
    eval_seconds = time.perf_counter() - t0 - (compensation.seconds - refit_before)

    report = build_report(config, out, job, inputs, loop, init_mask, final_mask, perplexities, world_size,
                          compensation.kind)
    plot_kept_per_layer(out / "kept_per_layer.png", inputs.space, final_mask, init_mask,
                        init_label=f"init mask ({chosen_init(config, loop)})")
    plot_loss_curve(out / "loss_curve.png", out / "metrics.jsonl")
    if compact:
        report["compacted_model"] = save_compacted_model(inputs.model, inputs.tokenizer, final_mask, out / "model",
                                                         compensation.kwargs(final_mask, "final_mask"))
        if job["export"] == "gguf":
            report["export"] = export_model(out / "model", out / "model.gguf", job["export_dtype"], progress)
    report.update(compensation.report())
    report["timings_s"].update(evaluation=eval_seconds, reconstruction=compensation.seconds - refit_before,
                               total_this_session=time.perf_counter() - t_start)
    atomic_write_json(out / "report.json", report)
    return report
