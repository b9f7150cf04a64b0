"""``bpp compact``: a mask → a smaller dense model, in memory or saved as a model folder, with the
optional transforms of the compacted weights (rounding channel counts, FLAP's bias compensation,
least-squares reconstruction, Pangu Light's re-initialisations)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..compaction import compact_model, layer_sizes, round_mask, save_compacted
from ..bias_compensation import FILE as COMPENSATION_FILE
from ..bias_compensation import BiasCompensation
from ..errors import BppError
from ..modelio import load_model
from ..fileio import write_error
from ..masks import Masks
from ..reconstruction import DAMPING, parse_damping
from ..reconstruction import reconstruct as refit
from ..runs import check_model_folder_target, check_target
from ..space import MaskSpace


def compact(model=None, masks: Masks | str | os.PathLike | None = None, out: str | os.PathLike | None = None, *,
            tokenizer=None, round_to: int | None = None, theta: Masks | None = None, bias_compensation: bool = False,
            reconstruct: bool = False, damping: float | str = DAMPING, clap: bool = False, slnp: bool = False,
            absorb_norms: bool = False, data: str | None = None, calib_windows: int = 32, calib_seq_len: int = 128,
            dtype: str = "float32", force: bool = False, allow_other_model: bool = False,
            export: str | None = None, export_dtype: str = "f32", progress: bool = False):
    """The model that ``masks`` (S = 1) leaves of ``model``, as dense, smaller weights.

    ``model``: a loaded model, or a folder / hub id / None (the embedded default) to load with
    ``dtype``. ``masks``: a :class:`bpp.Masks` or a ``mask.safetensors`` path. With ``out`` the
    result is also saved there as a model folder (``--force`` replaces it). ``round_to`` rounds
    each layer's kept channels up to a multiple, adding channels by ``theta`` (default: the
    ``theta.safetensors`` beside a mask file, else weight magnitude). ``reconstruct`` refits each
    width-pruned layer's o_proj / down_proj with an output bias by damped least squares
    (:func:`bpp.reconstruction.reconstruct`, λ = ``damping``); it replaces ``bias_compensation``.
    ``reconstruct``, ``bias_compensation``, ``clap``, ``slnp`` calibrate on ``calib_windows``
    windows of ``calib_seq_len`` tokens of ``data`` (default: the data of the ``bpp prune`` or
    ``bpp baseline`` run whose folder holds the mask file, else the embedded default), except that
    the bias compensation of a mask from a ``bpp prune`` run uses the calibration means that run
    judged its masks with (``bias_compensation.safetensors`` beside the mask file);
    ``absorb_norms`` folds RMSNorm scales into the next linear layers. A mask made for another
    model is refused unless ``allow_other_model``. ``out`` must be new, or (with ``force``) a model
    folder bpp wrote. ``export="gguf"`` also writes ``<out>.gguf`` for llama.cpp (``export_dtype``
    f32 | f16 | bf16 | q8_0). Returns the compacted model; ``model.bpp_compaction`` holds what was done."""
    from ..data import load_text, window_bos, windows
    from ..methods.flap import compensation_for
    from ..methods.magnitude import magnitude_metric
    from ..methods.pangu import PanguOptions, calibrate, transform

    if masks is None:
        raise BppError("give the mask to compact (a bpp.Masks, or the path of a mask.safetensors)")
    mask_path = None
    if not isinstance(masks, Masks):
        mask_path = Path(masks)
        masks = Masks.load(mask_path)
    gguf = None
    if export is not None:
        from .export import DTYPES

        if export != "gguf":
            raise BppError(f"unknown export format {export!r}; bpp exports gguf")
        if export_dtype not in DTYPES:
            raise BppError(f"unknown GGUF dtype {export_dtype!r}; use one of {', '.join(DTYPES)}")
        if out is None:
            raise BppError("exporting needs the folder to compact into (--out)")
        check_target(Path(out))  # not the current folder, nor one above it (`.` and `/` have no name to extend)
        gguf = Path(out).with_name(Path(out).name + ".gguf")
        if gguf.exists() and not force:
            raise BppError(f"{gguf} exists; pass --force to replace it")
    if clap and bias_compensation:
        raise BppError("--clap cannot be combined with --bias-compensation (CLAP replaces groups whose "
                       "pruned neighbours the compensation accounts for)")
    if reconstruct and bias_compensation:
        raise BppError("--reconstruct fits its own output biases; drop --bias-compensation")
    if reconstruct and (clap or slnp):
        raise BppError("--reconstruct cannot be combined with --clap or --slnp (they change the compacted layers "
                       "after the refit); choose one")
    damping = parse_damping(damping, "--damping")
    for name, value, low in (("--calib-windows", calib_windows, 1), ("--calib-seq-len", calib_seq_len, 2)):
        if not isinstance(value, int) or value < low:
            raise BppError(f"{name} must be an integer >= {low}, got {value!r}")
    calibrated = bias_compensation or reconstruct or clap or slnp
    if data is None:
        data = run_data(mask_path) if mask_path is not None else None
        data = data or "default"
    local = tuple(Path(p) for p in (model, mask_path, data) if isinstance(p, (str, os.PathLike)) and Path(p).exists())
    if out is not None:
        check_model_folder_target(out, force=force, protected=local)  # before any work
    if model is None or isinstance(model, (str, os.PathLike)):
        model, loaded_tokenizer = load_model(model, dtype=dtype)
        tokenizer = tokenizer or loaded_tokenizer
    space = MaskSpace.from_model(model)
    masks.validate(space)
    if masks.S != 1:
        raise BppError(f"{mask_path or 'masks'} holds {masks.S} masks; compaction takes one")
    if (clap or slnp) and masks.heads is not None and not bool(masks.heads.all()):
        raise BppError(f"{mask_path or 'masks'} prunes query heads inside KV groups, which --clap / --slnp do not "
                       "handle (they move and re-initialise whole groups); compact it without them")
    if not allow_other_model:
        masks.check_model(model, str(mask_path or "the mask"))
    info = {"mask": str(mask_path)} if mask_path is not None else {}
    if round_to:
        theta_file = mask_path.parent / "theta.safetensors" if mask_path is not None else None
        if theta is not None:
            scores, source = theta.channels, "θ"
        elif theta_file is not None and theta_file.is_file():
            scores, source = Masks.load(theta_file).channels, "θ"
        else:
            scores, source = magnitude_metric(model, space)["channel"], "weight magnitude"
        if source == "θ" and not (scores.is_floating_point() and torch.isfinite(scores).all()):
            raise BppError(f"{theta_file if theta is None else 'theta'} holds values that are not finite "
                           "probabilities; write it again with bpp prune, or remove it to round by weight magnitude")
        before = masks.channels.sum(-1)[0]
        masks = round_mask(masks, round_to, scores)
        info["round_to"] = {"multiple": round_to, "extra_channels_by": source, "channels_before": before.tolist(),
                            "channels_after": masks.channels.sum(-1)[0].tolist()}
    if gguf is not None and space.family == "gemma3_text" and not clap:  # CLAP moves groups between layers
        from ..gguf.gemma3 import refusal

        biased = bias_compensation or reconstruct
        error = refusal(f"--export gguf of {out}", [(s["kv_groups"], s["channels"], s["query_heads"])
                                                    for s in layer_sizes(space, masks, keep_empty=biased)], biased)
        if error is not None:  # before the calibration and the compaction
            raise error
    ids = windows(tokenizer, load_text(data, "calib"), calib_seq_len, calib_windows, seed=0,
                  bos=window_bos(model)) if calibrated else None
    if calibrated:
        info["calibration"] = {"data": data, "windows": calib_windows, "seq_len": calib_seq_len}
    pangu = PanguOptions(clap=clap, slnp=slnp, absorb_norms=absorb_norms)
    with torch.no_grad():
        if clap or slnp:
            calibrate(model, masks, ids, pangu)
        biases = {}
        saved = mask_path.parent / COMPENSATION_FILE if mask_path is not None else None
        if bias_compensation and saved is not None and saved.is_file():
            biases = BiasCompensation.load(model, saved).compact_biases(masks)
            info["bias_compensation_means"] = str(saved)
        elif bias_compensation:
            biases = compensation_for(model, masks, ids)
        elif reconstruct:
            biases = refit(model, masks, ids, damping=damping, progress=progress).compact_kwargs()
            info["reconstruction"] = {"damping": damping}
        small = compact_model(model, masks, transform=transform(pangu) if pangu.any else None, **biases)
        if out is not None:
            try:
                save_compacted(model, masks, out, tokenizer=tokenizer, force=force, info=info, compacted=small,
                               protected=local, **biases)
            except OSError as e:
                raise write_error(e, out) from None
            if gguf is not None:
                from .export import export_gguf

                info["export"] = {"path": str(export_gguf(out, gguf, dtype=export_dtype, force=force, progress=progress)),
                                  "format": "gguf", "dtype": export_dtype}
    small.bpp_compaction = {**info, "bias_compensation": bool(biases) and not reconstruct,
                            "reconstructed": reconstruct, **(small.bpp_transform or {})}
    return small


def run_data(mask_path: Path) -> str | None:
    """The calibration text of the ``bpp prune`` (``config.json``) or ``bpp baseline``
    (``report.json``) run whose folder holds ``mask_path``; None when the folder says nothing."""
    folder = Path(mask_path).parent
    for name, read in (("config.json", lambda d: d.get("data")),
                       ("report.json", lambda d: (d.get("config") or {}).get("data"))):
        try:
            found = read(json.loads((folder / name).read_text()))
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(found, str) and found:
            return found
    return None
