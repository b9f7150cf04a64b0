"""``bpp compact``: a saved mask → a smaller model folder."""
from __future__ import annotations

import json
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
        round_to: Optional[int] = typer.Option(None, "--round-to", help="round kept MLP channels per layer up to a multiple of 8, 16, 32, 64 or 128, adding the highest-θ channels (weight magnitude when DIR has no theta.safetensors)"),
        bias_compensation: bool = typer.Option(False, "--bias-compensation", help="FLAP-style: add the mean contribution of pruned units as output biases"),
        clap: bool = typer.Option(False, "--clap", help="Pangu Light Cross-Layer Attention Pruning: a dropped layer's best KV groups move into the next kept layer's slots"),
        slnp: bool = typer.Option(False, "--slnp", help="Pangu Light-style stabilisation: rescale each width-pruned block's output to its dense magnitude"),
        absorb_norms: bool = typer.Option(False, "--absorb-norms", help="fold RMSNorm scales into the next linear layers (same logits)"),
        data: str = typer.Option("default", "--data", help="calibration text for --bias-compensation, --clap, --slnp"),
        calib_windows: int = typer.Option(32, "--calib-windows", help="calibration windows of 128 tokens for --bias-compensation, --clap, --slnp"),
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
        if masks.S != 1:
            raise BppError(f"{mask} holds {masks.S} masks; compaction takes one")
        if out.exists() and not force:
            raise BppError(f"{out} exists; pass --force to replace it")
        info = {"mask": str(mask)}
        if round_to:
            theta_file = mask.parent / "theta.safetensors"
            if theta_file.is_file():
                scores, source = Masks.load(theta_file).channels, "θ"
            else:
                from .init import magnitude_metric

                scores, source = magnitude_metric(lm, space)["channel"], "weight magnitude"
            before = masks.channels.sum(-1)[0]
            masks = round_mask(masks, round_to, scores)
            after = masks.channels.sum(-1)[0]
            info["round_to"] = {"multiple": round_to, "extra_channels_by": source,
                                "channels_before": before.tolist(), "channels_after": after.tolist()}
            typer.echo(f"rounded kept channels per layer up to multiples of {round_to} (extra channels by {source}): "
                       f"{int(before.sum())} → {int(after.sum())}")
            typer.echo("  per layer: " + ", ".join(f"{int(x)}→{int(y)}" for x, y in zip(before, after)))
        if clap and bias_compensation:
            raise BppError("--clap cannot be combined with --bias-compensation (CLAP replaces groups whose "
                           "pruned neighbours the compensation accounts for)")
        from .data import load_text, windows
        from .pangu import PanguOptions, calibrate

        pangu = PanguOptions(clap=clap, slnp=slnp, absorb_norms=absorb_norms)
        ids = windows(tokenizer, load_text(data, "calib"), 128, calib_windows, seed=0) \
            if (bias_compensation or clap or slnp) else None
        if clap or slnp:
            calibrate(lm, masks, ids, pangu)
        biases = {}
        if bias_compensation:
            from .baselines import InputStats, compensation_biases

            attn_bias, mlp_bias = compensation_biases(lm, masks, InputStats(lm).collect(ids))
            biases = {"o_proj_bias": attn_bias, "down_proj_bias": mlp_bias}
        path = save_compacted(lm, masks, out, tokenizer=tokenizer, force=force, info=info, pangu=pangu, **biases)
        record = json.loads((path / "bpp_compaction.json").read_text())
        kept, total = record["params"], record["original_params"]
        kind = "stock config" if record["stock_config"] else "per-layer sizes, load with trust_remote_code=True"
        typer.echo(f"saved {path} ({kind}): {len(record['layers'])} layers, {kept:,} parameters "
                   f"({1 - kept / total:.1%} fewer than {total:,})")
        done = record.get("pangu_light", {})
        if "clap_moved_groups" in done:
            typer.echo(f"CLAP: {len(done['clap_moved_groups'])} KV groups moved from dropped layers")
        if "slnp_scales" in done:
            scales = done["slnp_scales"]["attention"] + done["slnp_scales"]["mlp"]
            typer.echo(f"SLNP: block output scales {min(scales):.3f} … {max(scales):.3f}")
        if "absorbed_norms" in done:
            typer.echo(f"absorbed {len(done['absorbed_norms'])} RMSNorm scales into the next linear layers")
