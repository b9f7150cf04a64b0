"""``bpp recover``: LoRA recovery fine-tuning of a pruned model folder, merged into one dense model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

# options that define the run; on --resume the ones not given are taken from the interrupted run
_RUN_OPTIONS = ("model", "data", "steps", "rank", "alpha", "dropout", "lr", "batch_size", "seq_len", "schedule",
                "warmup", "weight_decay", "max_grad_norm", "targets", "seed", "checkpoint_every", "no_eval",
                "eval_windows", "dtype")


def _saved_options(run: dict) -> dict:
    """The CLI option values of an interrupted run (its ``run.json``)."""
    rec = run["recover"]
    return {"model": run["model"], "data": run["data"], "dtype": run["dtype"], "steps": rec["steps"],
            "rank": rec["rank"], "alpha": rec["alpha"], "dropout": rec["dropout"], "lr": rec["lr"],
            "batch_size": rec["batch_size"], "seq_len": rec["seq_len"], "schedule": rec["schedule"],
            "warmup": rec["warmup"], "weight_decay": rec["weight_decay"], "max_grad_norm": rec["max_grad_norm"],
            "targets": ",".join(rec["target_modules"]), "seed": rec["seed"],
            "checkpoint_every": run["checkpoint_every"], "no_eval": not run["evaluate"],
            "eval_windows": run["eval_windows"]}


def register(app: typer.Typer) -> None:
    from .recover import TARGET_MODULES, RecoverConfig

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
        from click.core import ParameterSource

        from .errors import BppError
        from .recover import RUN_FILE, partial_dir, run_recover

        options = dict(ctx.params)
        if resume:
            run_file = partial_dir(out) / RUN_FILE
            if not run_file.is_file():
                done = " (it is finished)" if (out / "report.json").is_file() else ""
                raise BppError(f"nothing to resume: {partial_dir(out)} holds no checkpoint of a run for {out}{done}")
            saved = _saved_options(json.loads(run_file.read_text()))
            for name in _RUN_OPTIONS:
                if ctx.get_parameter_source(name) != ParameterSource.COMMANDLINE:
                    options[name] = saved[name]
        if options["model"] is None:
            raise BppError("give the pruned model folder with --model DIR")
        config = RecoverConfig(steps=options["steps"], rank=options["rank"], alpha=options["alpha"],
                               dropout=options["dropout"], lr=options["lr"], batch_size=options["batch_size"],
                               seq_len=options["seq_len"], schedule=options["schedule"], warmup=options["warmup"],
                               weight_decay=options["weight_decay"], max_grad_norm=options["max_grad_norm"],
                               seed=options["seed"],
                               target_modules=tuple(t.strip() for t in options["targets"].split(",") if t.strip()))
        report = run_recover(options["model"], out, config, data=options["data"], force=force, resume=resume,
                             evaluate=not options["no_eval"], eval_windows=options["eval_windows"],
                             checkpoint_every=options["checkpoint_every"], dtype=options["dtype"], device=device,
                             trust_remote_code=trust_remote_code, progress=not quiet)
        loss = report["train_loss"]
        line = (f"recovered {report['source_model']} with LoRA r={config.rank} on {', '.join(report['lora']['target_modules'])}: "
                f"{report['lora']['trainable_params']:,} trainable parameters, {config.steps} steps in "
                f"{report['timings_s']['train']:.1f} s; training loss {loss['first_10pct_mean']:.3f} → "
                f"{loss['last_10pct_mean']:.3f} (first/last 10% of steps)")
        typer.echo(line)
        ppl = report["perplexity"]
        if ppl:
            windows = "all windows" if ppl["max_windows"] is None else f"{ppl['max_windows']} windows"
            typer.echo(f"held-out perplexity ({ppl['data']}, seq_len {ppl['seq_len']}, {windows}): "
                       f"{ppl['before']:.3f} before, {ppl['after']:.3f} after")
        typer.echo(f"saved the merged model to {out} (report: {out / 'report.json'})")
