"""``bpp compact``: a saved mask → a smaller model folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..reconstruction import DAMPING


def register(app: typer.Typer) -> None:
    @app.command("compact")
    def compact_cmd(
        mask: Path = typer.Option(..., "--mask", help="mask.safetensors written by `bpp prune`"),
        out: Path = typer.Option(..., "--out", "-o", help="folder for the compacted model"),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="the model the mask was made for (default: embedded SmolLM2-135M-Instruct)"),
        force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
        round_to: Optional[int] = typer.Option(None, "--round-to", help="round kept MLP channels per layer up to a multiple of 8, 16, 32, 64 or 128, adding the highest-θ channels (weight magnitude when DIR has no theta.safetensors)"),
        bias_compensation: bool = typer.Option(False, "--bias-compensation", help="FLAP-style: add the mean contribution of pruned units as output biases (a bpp prune run's own calibration means when the mask's folder holds them)"),
        reconstruct: bool = typer.Option(False, "--reconstruct", help="refit each width-pruned layer's o_proj / down_proj (with an output bias) by damped least squares on calibration activations of the already-pruned model; replaces --bias-compensation"),
        damping: str = typer.Option(DAMPING, "--damping", help="--reconstruct: auto (per projection, the damping that does best on held-back calibration tokens) or a damping λ (times the mean input energy), pulling the refit towards the original weights"),
        clap: bool = typer.Option(False, "--clap", help="Pangu Light Cross-Layer Attention Pruning: a dropped layer's best KV groups move into the next kept layer's slots"),
        slnp: bool = typer.Option(False, "--slnp", help="Pangu Light-style stabilisation: rescale each width-pruned block's output to its dense magnitude"),
        absorb_norms: bool = typer.Option(False, "--absorb-norms", help="fold RMSNorm scales into the next linear layers (same logits)"),
        data: Optional[str] = typer.Option(None, "--data", help="calibration text for --reconstruct, --bias-compensation, --clap, --slnp (default: the data of the run whose folder holds the mask, else the embedded default)"),
        calib_windows: int = typer.Option(32, "--calib-windows", help="calibration windows for --reconstruct, --bias-compensation, --clap, --slnp"),
        calib_seq_len: int = typer.Option(128, "--calib-seq-len", help="tokens per calibration window"),
        dtype: str = typer.Option("float32", "--dtype"),
        allow_other_model: bool = typer.Option(False, "--allow-other-model", help="compact a mask made for another model of the same shape (refused by default)"),
        export: Optional[str] = typer.Option(None, "--export", help="also write OUT.gguf for llama.cpp: gguf"),
        export_dtype: str = typer.Option("f32", "--export-dtype", help="GGUF weights: f32 | f16 | bf16 | q8_0 (q8_0 needs --round-to 32)"),
    ):
        """Turn a mask into dense, smaller weights that load with plain transformers."""
        from ..jobs.compact import compact

        small = compact(model, mask, out, round_to=round_to, bias_compensation=bias_compensation,
                        reconstruct=reconstruct, damping=damping, clap=clap, slnp=slnp, absorb_norms=absorb_norms,
                        data=data, calib_windows=calib_windows, calib_seq_len=calib_seq_len, dtype=dtype, force=force,
                        allow_other_model=allow_other_model, export=export, export_dtype=export_dtype,
                        progress=reconstruct)
        done = small.bpp_compaction
        if "round_to" in done:
            r = done["round_to"]
            before, after = r["channels_before"], r["channels_after"]
            typer.echo(f"rounded kept channels per layer up to multiples of {round_to} (extra channels by "
                       f"{r['extra_channels_by']}): {sum(before)} → {sum(after)}")
            typer.echo("  per layer: " + ", ".join(f"{x}→{y}" for x, y in zip(before, after)))
        record = json.loads((out / "bpp_compaction.json").read_text())
        kept, total = record["params"], record["original_params"]
        kind = "stock config" if record["stock_config"] else "per-layer sizes, load with trust_remote_code=True"
        typer.echo(f"saved {out} ({kind}): {len(record['layers'])} layers, {kept:,} parameters "
                   f"({1 - kept / total:.1%} fewer than {total:,})")
        if record.get("reconstructed"):
            typer.echo("reconstructed: output projections of the width-pruned layers refit by least squares")
        pangu = record.get("pangu_light", {})
        if "clap_moved_groups" in pangu:
            typer.echo(f"CLAP: {len(pangu['clap_moved_groups'])} KV groups moved from dropped layers")
        if "slnp_scales" in pangu:
            scales = pangu["slnp_scales"]["attention"] + pangu["slnp_scales"]["mlp"]
            typer.echo(f"SLNP: block output scales {min(scales):.3f} … {max(scales):.3f}")
        if "absorbed_norms" in pangu:
            typer.echo(f"absorbed {len(pangu['absorbed_norms'])} RMSNorm scales into the next linear layers")
        if "export" in done:
            typer.echo(f"GGUF for llama.cpp: {done['export']['path']}")
