"""``bpp recover``: LoRA recovery fine-tuning of a pruned model folder, merged into one dense model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import given_on_command_line

# CLI option → job option (the rest of the job's options have the same names)
_RENAMED = {"targets": "target_modules", "no_eval": "evaluate"}


def _job_options(options: dict) -> dict:
    out = {}
    for name, value in options.items():
        if name == "targets":
            value = tuple(t.strip() for t in value.split(",") if t.strip())
        elif name == "no_eval":
            value = not value
        out[_RENAMED.get(name, name)] = value
    return out


def register(app: typer.Typer) -> None:
    from ..methods.recovery_config import TARGET_MODULES, RecoverConfig

    defaults = RecoverConfig()

    @app.command("recover")
    def recover_cmd(
        ctx: typer.Context,
        model: Optional[str] = typer.Option(None, "--model", "-m", help="the pruned model folder (bpp compact output, or a bpp prune / bpp baseline folder holding model/)"),
        out: Path = typer.Option(..., "--out", "-o", help="folder for the recovered model (+ report.json); checkpoints go to OUT.partial until it is done"),
        data: str = typer.Option("default", "--data", help="training text (its calib split) and held-out text: default | wikitext2 | c4 | ptb | file.txt"),
        steps: int = typer.Option(defaults.steps, "--steps", help="optimizer steps"),
        rank: int = typer.Option(defaults.rank, "--rank", "-r", help="LoRA rank"),
        alpha: float = typer.Option(defaults.alpha, "--alpha", help="LoRA alpha (the update is scaled by alpha/rank)"),
        lr: float = typer.Option(defaults.lr, "--lr", help="peak learning rate of AdamW"),
        batch_size: int = typer.Option(defaults.batch_size, "--batch-size", "-b", help="windows per step"),
        seq_len: int = typer.Option(defaults.seq_len, "--seq-len", help="tokens per training window"),
        schedule: str = typer.Option(defaults.schedule, "--schedule", help="cosine | linear | constant (after the warm-up)"),
        warmup: float = typer.Option(defaults.warmup, "--warmup", help="fraction of the steps with a linear warm-up"),
        dropout: float = typer.Option(defaults.dropout, "--dropout", help="LoRA dropout"),
        weight_decay: float = typer.Option(defaults.weight_decay, "--weight-decay"),
        max_grad_norm: float = typer.Option(defaults.max_grad_norm, "--max-grad-norm", help="gradient clipping (0: none)"),
        targets: str = typer.Option(",".join(TARGET_MODULES), "--targets", help="comma-separated module names that get adapters (those the model has)"),
        seed: int = typer.Option(defaults.seed, "--seed", help="seeds the training windows and the adapters' init"),
        checkpoint_every: int = typer.Option(10, "--checkpoint-every", help="steps between checkpoints (0: only at the end of training)"),
        eval_windows: Optional[int] = typer.Option(None, "--eval-windows", help="held-out windows of 128 tokens for the perplexity before/after (default: all)"),
        no_eval: bool = typer.Option(False, "--no-eval", help="skip the held-out perplexity"),
        force: bool = typer.Option(False, "--force", help="replace OUT (and any interrupted run for it)"),
        resume: bool = typer.Option(False, "--resume", help="continue the interrupted run for OUT (options not given are taken from it)"),
        dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16 (also the saved dtype)"),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="run the folder's own modeling file when it is not the one this bpp writes"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ):
        """Fine-tune a pruned model with LoRA to recover quality, merge the adapters, and save one dense model."""
        from ..jobs.recover import recover

        run_options = ("data", "steps", "rank", "alpha", "dropout", "lr", "batch_size", "seq_len", "schedule", "warmup",
                       "weight_decay", "max_grad_norm", "targets", "seed", "checkpoint_every", "no_eval",
                       "eval_windows", "dtype")
        # a new run takes every option; a resumed one only those typed, which must agree with it
        given = given_on_command_line(ctx, run_options) if resume else {k: ctx.params[k] for k in run_options}
        report = recover(model, out, force=force, resume=resume, device=device, trust_remote_code=trust_remote_code,
                         progress=not quiet, **_job_options(given))
        config = report["config"]
        loss = report["train_loss"]
        line = (f"recovered {report['source_model']} with LoRA r={config['rank']} on {', '.join(report['lora']['target_modules'])}: "
                f"{report['lora']['trainable_params']:,} trainable parameters, {config['steps']} steps in "
                f"{report['timings_s']['train']:.1f} s; training loss {loss['first_10pct_mean']:.3f} → "
                f"{loss['last_10pct_mean']:.3f} (first/last 10% of steps)")
        typer.echo(line)
        ppl = report["perplexity"]
        if ppl:
            windows = "all windows" if ppl["max_windows"] is None else f"{ppl['max_windows']} windows"
            typer.echo(f"held-out perplexity ({ppl['data']}, seq_len {ppl['seq_len']}, {windows}): "
                       f"{ppl['before']:.3f} before, {ppl['after']:.3f} after")
        typer.echo(f"saved the merged model to {out} (report: {out / 'report.json'})")
