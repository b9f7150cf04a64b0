"""The steps of ``bpp prune`` (:mod:`bpp.jobs.prune` calls them in order): load and check the
inputs, start or resume the search, write the masks, evaluate them, build the report, save the
compacted model and its export. A failure to compact or export does not lose the run."""
from __future__ import annotations

import errno
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bias_compensation import BiasCompensation, InputStats
from ..checkpoints import CHECKPOINT, malformed_checkpoint
from ..data import window_bos
from ..errors import BppError
from ..evaluation import check_eval_options, compacted_perplexity, masked_perplexity
from ..fileio import atomic_write_json, atomic_write_text, read_jsonl
from ..masks import Masks
from ..embedded import EMBEDDED_MODELS
from ..search import (MaskLosses, PruneConfig, SearchLoop, SearchStart, calibration_batches, config_budget, mask_losses,
                      needs_ranking, needs_stats, new_policy, resumed_policy, selection_windows)
from ..search.config import model_dtype, rounds
from ..search.objective import passes_over_text
from ..space import MaskSpace, fingerprint_difference, model_fingerprint
from .written import OutputCompensation, choose_start, init_calibration

# options of the job that do not change the mask; a resumed run keeps its own unless given again
JOB_DEFAULTS = {"checkpoint_every": 20, "eval_windows": None, "eval_seq_len": 128, "evaluate": True,
                "export": None, "export_dtype": "f32"}
EXPORT_FORMATS = ("gguf",)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of steps at or after ``step`` (they are re-run after a resume), and a last
    line an earlier session left half-written."""
    if not path.is_file():
        return
    records = read_jsonl(path, "the metrics")
    if not all(isinstance(r.get("step"), int) for r in records):
        raise BppError(f"{path} holds a record without a step number: the file is corrupt; remove it or start "
                       "a new run")
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records if r["step"] < step))



@dataclass
class Inputs:
    """What a run reads, loaded and checked before its folder is touched."""

    model: object
    tokenizer: object
    space: MaskSpace
    calib_ids: torch.Tensor
    windows: torch.Tensor  # the search's batches
    selection_ids: torch.Tensor | None  # the incumbent's held-in windows
    held: torch.Tensor | None  # held-out tokens for the evaluation
    losses: MaskLosses
    step_losses: object  # the losses the steps use (sharded over ranks when there are several)
    backend: str
    fingerprint: dict
    seconds: float


def job_options(state: dict | None, given: dict, compact: bool) -> tuple[dict, dict]:
    """The job's options (the saved ones of a resumed run, replaced by those given again), checked,
    and the ones that changed on resume."""
    saved_job = (state or {}).get("extra", {}).get("job", {})
    job = {**JOB_DEFAULTS, **saved_job, **given}
    check_eval_options(job["eval_seq_len"], job["eval_windows"])
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
    return job, changed


def load_inputs(config: PruneConfig, job: dict, model, tokenizer, losses_fn, rank: int, world_size: int, sharded) -> Inputs:
    """Load the model and the text and check that they fit the run (enough text for its steps,
    a budget the model can meet), before anything is written."""
    from ..data import load_text, tokenize
    from ..methods import init_candidates
    from ..modelio import load_model

    init_candidates(config.init)
    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = load_model(None if config.model == "default" else config.model,
                                      dtype=model_dtype(config), device=config.device, device_map=config.device_map)
    space = MaskSpace.from_model(model)
    config_budget(space, config)  # a sparsity the granularity can meet
    calib_ids = tokenize(tokenizer, load_text(config.data, "calib"))
    bos = window_bos(model)  # Gemma: every window starts with BOS
    windows = calibration_batches(calib_ids, config, bos)
    selection_ids = selection_windows(calib_ids, config, bos)
    held = tokenize(tokenizer, load_text(config.data, "heldout")) if job["evaluate"] else None
    check_eval_options(job["eval_seq_len"], job["eval_windows"], held, config.data)
    losses, backend = mask_losses(model, config, losses_fn)
    step_losses = losses
    if world_size > 1:
        step_losses = sharded(losses, rank, world_size)
        backend = f"{backend} sharded over {world_size} ranks"
    return Inputs(model, tokenizer, space, calib_ids, windows, selection_ids, held, losses, step_losses, backend,
                  model_fingerprint(model), time.perf_counter() - t0)


def start_search(config: PruneConfig, out: Path, inputs: Inputs, loop_args: tuple, job: dict, writer: bool,
                 progress: bool = False, written: "OutputCompensation | None" = None) -> tuple[SearchLoop, Masks | None]:
    """A fresh run: calibrate, run the init method (or choose among several, :func:`.written.choose_start`,
    writing the candidates with ``written``), rank the units, and build the search."""
    from ..methods import init_candidates, method, rank_scores

    if writer:
        atomic_write_json(out / "config.json", config.to_dict())
    t0 = time.perf_counter()
    model, space = inputs.model, inputs.space
    calib = None
    if (any(method(name, "init").calibrated for name in init_candidates(config.init)) or needs_stats(config)
            or config.attention_units == "heads"):
        # (query-head slots start from FLAP's per-slot fluctuation, which reads calibration windows)
        calib = init_calibration(config, inputs)
    with torch.no_grad():
        stats = InputStats(model).collect(calib, progress=progress) if needs_stats(config) else None
        if config.bias_compensation:
            inputs.losses.compensation = BiasCompensation.from_stats(model, stats)
        init, (theta, init_mask, metrics), choice = choose_start(config, inputs, calib, progress, written)
        ranking = rank_scores(needs_ranking(config), model, space, stats, calib, config.sparsity, init, metrics)
        policy = new_policy(space, config, SearchStart(theta, init_mask, metrics, ranking))
        if config.attention_units == "heads" and init_mask is not None and init_mask.heads is None:
            # the init method pruned KV groups (the count policies): the search starts from its channels
            # and its share of attention as query-head slots, on the budget (the policy's mask); so does
            # the incumbent
            init_mask = policy.deterministic_mask()
    loop = SearchLoop(policy, *loop_args, window_losses=inputs.losses.per_window)
    if init_mask is not None and writer:
        init_mask.save(out / "init_mask.safetensors", model=inputs.fingerprint)
    if inputs.losses.compensation is not None:
        loop.extra_state["compensation"] = inputs.losses.compensation.state()
    loop.extra_state["init"] = init
    if choice is not None:
        loop.extra_state["init_choice"] = choice
    loop.extra_state.update({"init_seconds": time.perf_counter() - t0, "sessions": 1, "job": job,
                             "model": {"name": model_name(config.model), "fingerprint": inputs.fingerprint}})
    return loop, init_mask


def chosen_init(config: PruneConfig, loop: SearchLoop) -> str:
    """The init method the run started from (``--init auto``: the one it chose)."""
    return loop.extra_state.get("init", loop.extra_state.get("init_choice", {}).get("chosen", config.init))


def model_name(model: str) -> str:
    """The model as a run records it: a local folder's resolved path (where a symlink led), else its name."""
    path = Path(model).expanduser()
    return str(path.resolve()) if model not in EMBEDDED_MODELS and path.exists() else str(model)


def check_resumed_model(state: dict, config: PruneConfig, fingerprint: dict) -> None:
    """Refuse to resume a run on another model than the one its checkpoint was made on (checkpoints
    that do not record it are taken as they are)."""
    saved = state.get("extra", {}).get("model")
    if saved is None:
        return
    reason = fingerprint_difference(saved["fingerprint"], fingerprint)
    if reason:
        raise BppError(f"the run was made on the model {saved['name']}, but {model_name(config.model)} is another "
                       f"model ({reason}); resume with the model the run was made on, or start a new run")


def resume_search(config: PruneConfig, out: Path, inputs: Inputs, state: dict, loop_args: tuple, job: dict, changed: dict,
            writer: bool) -> tuple[SearchLoop, Masks | None]:
    """A resumed run: the search as its checkpoint left it, and the bias compensation it was judged with."""
    with malformed_checkpoint(out / CHECKPOINT):
        loop = SearchLoop(resumed_policy(inputs.space, config, state), *loop_args,
                          window_losses=inputs.losses.per_window)
        loop.load_state_dict(state)
    init_mask = Masks.load(out / "init_mask.safetensors") if (out / "init_mask.safetensors").is_file() else None
    saved = loop.extra_state.get("compensation")
    if saved is not None:  # the very means the run's masks were judged with
        inputs.losses.compensation = BiasCompensation(inputs.model, saved["attn_means"], saved["mlp_means"])
    if writer:
        truncate_metrics(out / "metrics.jsonl", loop.step)
    loop.extra_state["sessions"] = loop.extra_state.get("sessions", 1) + 1
    loop.extra_state["job"] = job
    if changed:
        loop.extra_state.setdefault("job_changes", []).append({"session": loop.extra_state["sessions"], **changed})
    return loop, init_mask


def write_masks(loop: SearchLoop, out: Path, fingerprint: dict) -> tuple[Masks, Masks]:
    """The output mask (the incumbent), the policy's own files, and the deterministic mask when it
    differs from the output."""
    deterministic = loop.deterministic_mask()
    final_mask = loop.output_mask()
    final_mask.save(out / "mask.safetensors", model=fingerprint)
    for name, content in loop.outputs().items():
        if isinstance(content, Masks):
            content.save(out / name, model=fingerprint)
        else:
            atomic_write_json(out / name, content)
    if deterministic != final_mask:
        deterministic.save(out / "deterministic_mask.safetensors", model=fingerprint)
    return final_mask, deterministic


def evaluate_masks(inputs: Inputs, job: dict, init_mask: Masks | None, final_mask: Masks,
                   compensation: OutputCompensation) -> dict:
    """Held-out perplexity of the dense model and of the init and final masks as they would be
    written (the final mask last, so that its reconstruction is the one kept for the written model).
    The deterministic mask is saved but not evaluated: its refit would cost as much as the output's."""
    model, tok, held = inputs.model, inputs.tokenizer, inputs.held
    seq_len, windows = job["eval_seq_len"], job["eval_windows"]

    bar = lambda name: f"held-out perplexity, {name.replace('_', ' ')}" if compensation.progress else False  # noqa: E731

    def ppl(mask: Masks, name: str) -> float:
        return compacted_perplexity(model, tok, held, mask, compensation.kwargs(mask, name), seq_len, windows,
                                    bar(name))

    with torch.no_grad():
        out = {"dense": masked_perplexity(model, tok, held, None, seq_len, windows, bar("dense model"))}
        if init_mask is not None:
            out["init_mask"] = ppl(init_mask, "init_mask")
        out["final_mask"] = ppl(final_mask, "final_mask")
    return out


def build_report(config: PruneConfig, out: Path, job: dict, inputs: Inputs, loop: SearchLoop, init_mask: Masks | None,
            final_mask: Masks, perplexities: dict, world_size: int, compensation: str) -> dict:
    space, budget = inputs.space, loop.budget
    return {
        "config": config.to_dict(),
        "out": str(out),
        "job": job,
        "job_changes_on_resume": loop.extra_state.get("job_changes", []),
        "losses_backend": inputs.backend,
        "world_size": world_size,
        "steps_done": loop.step,
        "evaluations": loop.evaluations,
        "calibration_passes": passes_over_text(inputs.calib_ids, config, window_bos(inputs.model)),
        "rounds": rounds(config),
        "skipped_steps": loop.skipped_steps,
        "dropped_masks": loop.dropped_masks,
        "sessions": loop.extra_state.get("sessions", 1),
        "init": chosen_init(config, loop),
        "init_choice": loop.extra_state.get("init_choice"),
        "params": {
            "dense": space.total_params,
            "prunable": space.prunable_params,
            "learned_units": budget.learned_params,
            "budget_targets": budget.targets(),
            "init_mask": budget.summary(init_mask),
            "final_mask": budget.summary(final_mask),
        },
        "perplexity": {"data": f"{config.data}/heldout", "seq_len": job["eval_seq_len"],
                       "max_windows": job["eval_windows"], "compensation": compensation,
                       "bias_compensation": compensation == "bias", **perplexities},
        **loop.summary(),
        "timings_s": {
            "load_this_session": inputs.seconds,
            "init": loop.extra_state.get("init_seconds"),
            "policy_gradient": loop.seconds,
            "per_step": loop.seconds / max(loop.step, 1),
        },
    }


def save_compacted_model(model, tokenizer, mask: Masks, path: Path, biases: dict | None = None) -> dict:
    """Compact and save the pruned model with its compensation (``biases``: output biases and refit
    weights as :func:`bpp.compaction.compact_model` takes them). A failure there does not lose the
    run: mask and θ are already saved, and the report says why."""
    from ..compaction import save_compacted

    try:
        saved = save_compacted(model, mask, path, tokenizer=tokenizer, force=True, **(biases or {}))
    except (BppError, OSError) as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # a full disk: the rest of the run cannot be written either; free space, then --resume
        warnings.warn(f"compaction failed: {e}; the mask is saved, run `bpp compact` on it later", stacklevel=2)
        return {"path": None, "error": str(e)}
    return {"path": str(saved)}


def export_model(folder: Path, path: Path, dtype: str, progress: bool) -> dict:
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
