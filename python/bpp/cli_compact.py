"""``bpp compact``: a saved mask → a smaller model folder."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("compact")
    def compact_cmd(
        mask: Path = typer.Option(..., "--mask", help="mask.safetensors written by `bpp prune`"),
        out: Path = typer.Option(..., "--out", "-o", help="folder for the compacted model"),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="the model the mask was made for (default: embedded SmolLM2-135M-Instruct)"),
        force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
        round_to: Optional[int] = typer.Option(None, "--round-to", help="round kept channels per layer up to a multiple of 8, 64 or 128 (highest θ first)"),
        bias_compensation: bool = typer.Option(False, "--bias-compensation", help="FLAP-style: add the mean contribution of pruned units as output biases"),
        data: str = typer.Option("default", "--data", help="calibration text for --bias-compensation"),
        calib_windows: int = typer.Option(32, "--calib-windows", help="calibration windows of 128 tokens for --bias-compensation"),
        dtype: str = typer.Option("float32", "--dtype"),
    ):
        """Turn a mask into dense, smaller weights that load with plain transformers."""
        from . import load_model
        from .compact import round_mask, save_compacted
        from .errors import BppError
        from .space import Masks, MaskSpace

        masks = Masks.load(mask)
        lm, tokenizer = load_model(model, dtype=dtype)
        space = MaskSpace.from_model(lm)
        masks.validate(space)
        if out.exists() and not force:
            raise BppError(f"{out} exists; pass --force to replace it")
        if round_to:
            theta_file = mask.parent / "theta.safetensors"
            theta = Masks.load(theta_file) if theta_file.is_file() else None
            before = int(masks.channels.sum())
            masks = round_mask(masks, round_to, theta)
            typer.echo(f"rounded kept channels to multiples of {round_to}: {before} → {int(masks.channels.sum())} "
                       f"(extra channels by {'θ' if theta is not None else 'index order'})")
        biases = {}
        if bias_compensation:
            from .baselines import InputStats, compensation_biases
            from .data import load_text, windows

            ids = windows(tokenizer, load_text(data, "calib"), 128, calib_windows, seed=0)
            attn_bias, mlp_bias = compensation_biases(lm, masks, InputStats(lm).collect(ids))
            biases = {"o_proj_bias": attn_bias, "down_proj_bias": mlp_bias}
        path = save_compacted(lm, masks, out, tokenizer=tokenizer, force=force, **biases)
        kept = int(space.params(masks)[0])
        typer.echo(f"saved {path}: {kept:,} parameters ({1 - kept / space.total_params:.1%} fewer than {space.total_params:,})")
