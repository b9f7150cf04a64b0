"""``bpp baseline``: the metric baselines (magnitude, wanda-sp, FLAP) as masks that the same
compaction, evaluation and ``bpp report`` consume, at the sparsity given to ``bpp prune``."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

# Companion baselines (issue 10), "module:function" with the signature
# ``fn(model, space, calib, sparsity) -> Masks`` (S = 1, the same per-type keep counts as a PG mask)
COMPANION_BASELINES = {"loraprune": "bpp.loraprune:loraprune_mask", "besa": "bpp.besa:besa_mask"}
METHODS = ("flap", "wanda-sp", "magnitude", *COMPANION_BASELINES)


def run_baseline(method: str, sparsity: float, out: Path, *, model=None, tokenizer=None, model_name: str = "default",
                 data: str = "default", calib_windows: int = 32, calib_seq_len: int = 128, seed: int = 0,
                 bias_compensation: bool = True, eval_seq_len: int = 128, eval_windows: int | None = None,
                 force: bool = False) -> dict:
    """Write ``mask.safetensors``, ``model/`` (compacted) and ``report.json`` for one baseline."""
    import torch

    from .compact import compact, save_compacted
    from .data import load_text, tokenize, windows
    from .engine import _prepare_out_dir, param_summary
    from .errors import BppError
    from .evaluate import perplexity
    from .load import load_model
    from .policy import Policy, check_sparsity
    from .space import MaskSpace

    if method not in METHODS:
        raise BppError(f"unknown baseline {method!r}; use one of {', '.join(METHODS)}")
    check_sparsity(sparsity)
    _prepare_out_dir(out, force)
    t_start = time.perf_counter()
    if model is None:
        model, tokenizer = load_model(None if model_name == "default" else model_name)
    space = MaskSpace.from_model(model)
    calib = windows(tokenizer, load_text(data, "calib"), calib_seq_len, calib_windows, seed=seed)
    biases = {}
    with torch.no_grad():
        if method == "flap":
            from .baselines import InputStats, compensation_biases, flap_mask

            stats = InputStats(model).collect(calib)
            mask = flap_mask(model, calib, sparsity, stats=stats)
            if bias_compensation:
                attn_bias, mlp_bias = compensation_biases(model, mask, stats)
                biases = {"o_proj_bias": attn_bias, "down_proj_bias": mlp_bias}
        elif method in COMPANION_BASELINES:
            from .init import _companion

            mask = _companion(COMPANION_BASELINES[method])(model, space, calib, sparsity)
        else:
            from .init import metric_mask

            mask = metric_mask(model, space, method, sparsity, calib if method == "wanda-sp" else None)
    mask_seconds = time.perf_counter() - t_start
    mask.save(out / "mask.safetensors")
    save_compacted(model, mask, out / "model", tokenizer=tokenizer, force=True, **biases)
    held = tokenize(tokenizer, load_text(data, "heldout"))
    with torch.no_grad():
        small = compact(model, mask, **biases)
        ppl = {"dense": perplexity(model, tokenizer, held, seq_len=eval_seq_len, max_windows=eval_windows),
               "final_mask": perplexity(small, tokenizer, held, seq_len=eval_seq_len, max_windows=eval_windows)}
    report = {
        "config": {"method": method, "model": model_name, "data": data, "sparsity": sparsity,
                   "calib_windows": calib_windows, "calib_seq_len": calib_seq_len, "seed": seed,
                   "bias_compensation": bool(biases)},
        "params": {"dense": space.total_params, "prunable": space.prunable_params,
                   "final_mask": param_summary(space, Policy(space, "channel,group", sparsity), mask)},
        "perplexity": {"data": f"{data}/heldout", "seq_len": eval_seq_len, "max_windows": eval_windows,
                       "evaluated_on": "compacted model", **ppl},
        "timings_s": {"mask": mask_seconds, "total_this_session": time.perf_counter() - t_start},
        "compacted_model": str(out / "model"),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def register(app: typer.Typer) -> None:
    @app.command("baseline")
    def baseline_cmd(
        method: str = typer.Option("flap", "--method", help="flap | wanda-sp | magnitude | loraprune | besa"),
        model: str = typer.Option("default", "--model", "-m", help="local Hugging Face folder, hub id, or 'default'"),
        data: str = typer.Option("default", "--data", help="calibration/held-out text: default | wikitext2 | c4 | ptb | file.txt"),
        sparsity: float = typer.Option(0.2, "--sparsity", "-s", help="fraction of the prunable (group + channel) parameters to remove"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: baseline-<method>-<sparsity>)"),
        force: bool = typer.Option(False, "--force", help="overwrite the output folder's bpp files"),
        calib_windows: int = typer.Option(32, "--calib-windows"),
        calib_seq_len: int = typer.Option(128, "--calib-seq-len"),
        bias_compensation: bool = typer.Option(True, "--bias-compensation/--no-bias-compensation", help="FLAP only"),
        eval_seq_len: int = typer.Option(128, "--eval-seq-len"),
        eval_windows: Optional[int] = typer.Option(None, "--eval-windows"),
        seed: int = typer.Option(0, "--seed"),
    ):
        """A metric baseline mask (FLAP, wanda-sp, magnitude), compacted and evaluated like `bpp prune`."""
        target = out or Path(f"baseline-{method}-{sparsity:g}")
        report = run_baseline(method, sparsity, target, model_name=model, data=data, calib_windows=calib_windows,
                              calib_seq_len=calib_seq_len, seed=seed, bias_compensation=bias_compensation,
                              eval_seq_len=eval_seq_len, eval_windows=eval_windows, force=force)
        ppl = report["perplexity"]
        typer.echo(f"{method} at {sparsity:g}: {report['params']['final_mask']['params']:,} parameters; held-out "
                   f"perplexity (seq_len {ppl['seq_len']}) dense {ppl['dense']:.3f}, pruned {ppl['final_mask']:.3f}; "
                   f"output in {target}")
