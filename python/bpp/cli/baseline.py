"""``bpp baseline``: a method's own mask at the parameter count of ``bpp prune`` at that sparsity,
compacted and evaluated the same way (:func:`bpp.jobs.baseline.baseline`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..methods import BASELINE_METHODS
from ..reconstruction import DAMPING


def register(app: typer.Typer) -> None:
    @app.command("baseline")
    def baseline_cmd(
        method: str = typer.Option("flap", "--method", help=" | ".join(BASELINE_METHODS)),
        model: str = typer.Option("default", "--model", "-m", help="local Hugging Face folder, hub id, or 'default'"),
        data: str = typer.Option("default", "--data", help="calibration/held-out text: default | wikitext2 | c4 | ptb | file.txt"),
        sparsity: float = typer.Option(0.2, "--sparsity", "-s", help="fraction of the prunable (group + channel) parameters to remove"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: baseline-<method>-<sparsity>)"),
        force: bool = typer.Option(False, "--force", help="overwrite the output folder's bpp files"),
        calib_windows: int = typer.Option(32, "--calib-windows"),
        calib_seq_len: int = typer.Option(128, "--calib-seq-len"),
        compensation: Optional[str] = typer.Option(None, "--compensation", help="none | bias (FLAP's output biases) | reconstruct (least-squares refit of the output projections); default: the method as published (FLAP: bias, the others: none)"),
        damping: str = typer.Option(DAMPING, "--damping", help="--compensation reconstruct: auto (per projection, the damping that does best on held-back calibration tokens) or a damping λ (times the mean input energy), pulling the refit towards the original weights"),
        eval_seq_len: int = typer.Option(128, "--eval-seq-len"),
        eval_windows: Optional[int] = typer.Option(None, "--eval-windows"),
        seed: int = typer.Option(0, "--seed"),
    ):
        """A method's own mask (FLAP, wanda-sp, magnitude, BESA, LoRAPrune), compacted and evaluated like `bpp prune`."""
        from ..jobs.baseline import baseline

        report = baseline(method, sparsity, out, model=model, data=data, calib_windows=calib_windows,
                              calib_seq_len=calib_seq_len, seed=seed, compensation=compensation, damping=damping,
                              eval_seq_len=eval_seq_len, eval_windows=eval_windows, force=force)
        ppl = report["perplexity"]
        typer.echo(f"{method} at {sparsity:g} (compensation: {report['config']['compensation']}): {report['params']['final_mask']['params']:,} parameters; held-out "
                   f"perplexity (seq_len {ppl['seq_len']}) dense {ppl['dense']:.3f}, pruned {ppl['final_mask']:.3f}; "
                   f"output in {report['out']}")
