"""``bpp baseline``: a method's own mask (FLAP, wanda-sp, magnitude, BESA, LoRAPrune) at the
parameter count of a policy-gradient mask at the same sparsity, compacted and evaluated the way
``bpp prune`` is, so ``bpp report`` compares them."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..compaction import compact_model, save_compacted
from ..data import load_text, tokenize, window_bos, windows
from ..errors import BppError
from ..evaluation import check_eval_options, perplexity
from ..methods import baseline_mask
from ..methods import method as method_entry
from ..methods.flap import compensation_for
from ..modelio import load_model
from ..budget import Budget, check_sparsity
from ..fileio import atomic_write_json, write_error
from ..reconstruction import DAMPING, parse_damping, reconstruct
from ..runs import RunFolder
from ..space import MaskSpace, model_fingerprint

OUTPUT_FILES = ("mask.safetensors", "report.json", "model")
COMPENSATIONS = ("none", "bias", "reconstruct")


def resolve_compensation(method: str, compensation: str | None) -> str:
    """The compensation a baseline's compacted model gets: ``compensation`` when given, else the
    method's as published (FLAP: its bias compensation; the others: none)."""
    if compensation is None:
        return "bias" if method == "flap" else "none"
    if compensation not in COMPENSATIONS:
        raise BppError(f"unknown compensation {compensation!r}; use one of {', '.join(COMPENSATIONS)}")
    return compensation


def baseline(method: str = "flap", sparsity: float = 0.2, out: str | Path | None = None, *, model=None,
             tokenizer=None, data: str = "default", calib_windows: int = 32,
             calib_seq_len: int = 128, seed: int = 0, compensation: str | None = None, damping: float | str = DAMPING,
             eval_seq_len: int = 128, eval_windows: int | None = None, force: bool = False) -> dict:
    """Write ``mask.safetensors``, ``model/`` (compacted) and ``report.json`` for one baseline into
    ``out`` (default ``baseline-<method>-<sparsity>``); returns the report. ``compensation`` of the
    compacted model: ``"none"``, ``"bias"`` (FLAP's output biases) or ``"reconstruct"``
    (least-squares refit of the output projections, :func:`bpp.reconstruction.reconstruct`, λ =
    ``damping``), calibrated on the method's own windows; None: the method as published (FLAP with
    its biases, the others without). ``model``: a folder / hub id / None (the embedded default), or
    a loaded model passed with its ``tokenizer``."""
    method_entry(method, "baseline")
    check_sparsity(sparsity)
    compensation = resolve_compensation(method, compensation)
    damping = parse_damping(damping, "--damping")
    check_eval_options(eval_seq_len, eval_windows)
    out = Path(out) if out is not None else Path(f"baseline-{method}-{sparsity:g}")
    local = tuple(Path(p) for p in (model, data) if isinstance(p, (str, os.PathLike)) and Path(p).exists())
    folder = RunFolder(out, "baseline").open(force=force, protected=local)
    ok = False
    try:
        report = _run(method, sparsity, out, folder, model=model, tokenizer=tokenizer, data=data,
                      calib_windows=calib_windows, calib_seq_len=calib_seq_len, seed=seed,
                      compensation=compensation, damping=damping, eval_seq_len=eval_seq_len,
                      eval_windows=eval_windows, force=force)
        ok = True
        return report
    except OSError as e:
        raise write_error(e, out) from None
    finally:
        folder.close(ok)


def _run(method, sparsity, out: Path, folder: RunFolder, *, model, tokenizer, data, calib_windows, calib_seq_len,
         seed, compensation, damping, eval_seq_len, eval_windows, force) -> dict:
    t_start = time.perf_counter()
    model_name = "default"
    if model is None or isinstance(model, (str, os.PathLike)):
        model_name = str(model or "default")
        model, tokenizer = load_model(None if model_name == "default" else model_name)
    else:
        model_name = str(getattr(model.config, "_name_or_path", "") or "in-memory model")
    space = MaskSpace.from_model(model)
    calib = windows(tokenizer, load_text(data, "calib"), calib_seq_len, calib_windows, seed=seed,
                    bos=window_bos(model))
    held = tokenize(tokenizer, load_text(data, "heldout"))
    check_eval_options(eval_seq_len, eval_windows, held, data)
    folder.claim(force=force, files=OUTPUT_FILES)
    biases = {}
    with torch.no_grad():
        mask = baseline_mask(method, model, space, calib, sparsity)
        if compensation == "bias":
            biases = compensation_for(model, mask, calib)
        elif compensation == "reconstruct":
            biases = reconstruct(model, mask, calib, damping=damping).compact_kwargs()
    mask_seconds = time.perf_counter() - t_start
    mask.save(out / "mask.safetensors", model=model_fingerprint(model))
    with torch.no_grad():
        small = compact_model(model, mask, **biases)
        save_compacted(model, mask, out / "model", tokenizer=tokenizer, force=True, compacted=small, **biases)
        ppl = {"dense": perplexity(model, tokenizer, held, seq_len=eval_seq_len, max_windows=eval_windows),
               "final_mask": perplexity(small, tokenizer, held, seq_len=eval_seq_len, max_windows=eval_windows)}
    report = {
        "out": str(out),
        "config": {"method": method, "model": model_name, "data": data, "sparsity": sparsity,
                   "calib_windows": calib_windows, "calib_seq_len": calib_seq_len, "seed": seed,
                   "compensation": compensation, "bias_compensation": compensation == "bias",
                   **({"damping": damping} if compensation == "reconstruct" else {})},
        "params": {"dense": space.total_params, "prunable": space.prunable_params,
                   "final_mask": Budget(space, "channel,group", sparsity).summary(mask)},
        "perplexity": {"data": f"{data}/heldout", "seq_len": eval_seq_len, "max_windows": eval_windows,
                       "evaluated_on": "compacted model", **ppl},
        "timings_s": {"mask": mask_seconds, "total_this_session": time.perf_counter() - t_start},
        "compacted_model": str(out / "model"),
    }
    atomic_write_json(out / "report.json", report)
    return report
