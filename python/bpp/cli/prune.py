"""``bpp prune``: learn a structured mask by policy gradient and write the pruned result."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..search import PruneConfig
from .options import given_on_command_line

_D = PruneConfig()  # the defaults, in one place


def register(app: typer.Typer) -> None:
    @app.command("prune")
    def prune_cmd(
        ctx: typer.Context,
        model: str = typer.Option(_D.model, "--model", "-m", help="local Hugging Face folder, hub id, 'default' (embedded SmolLM2-135M-Instruct) or 'gemma3-270m' (embedded Gemma 3 270M)"),
        data: str = typer.Option(_D.data, "--data", help="calibration/held-out text: default | wikitext2 | c4 | ptb | path/to/file.txt"),
        sparsity: float = typer.Option(_D.sparsity, "--sparsity", "-s", help="fraction of the learned units' parameters to remove, in (0, 1)"),
        granularity: str = typer.Option(_D.granularity, "--granularity", help="unit types to prune: group,channel | group | channel | layer"),
        policy: str = typer.Option(_D.policy, "--policy", help="allocation: learn per-layer kept counts of channels and KV groups over a metric's ranking (default) | units: the official per-unit keep-probabilities | evopress: an EvoPress-style (1 + λ) evolutionary search over the allocation policy's counts, from its start, under its budget and loss (a forward-only baseline without a gradient; --samples: parent + offspring per generation)"),
        budget: Optional[str] = typer.Option(_D.budget, "--budget", help="count: one budget per unit type (units' default, official); params: one joint parameter budget (allocation's only budget)"),
        steps: Optional[int] = typer.Option(_D.steps, "--steps", help="policy-gradient steps, one calibration batch each (allocation: 60, units: 100); a search longer than the text goes over it again in a new order"),
        evaluations: Optional[int] = typer.Option(_D.evaluations, "--evaluations", "-n", help="mask evaluations of the search (sets --steps: N / samples); the allocation policy runs rounds of 480, each re-centred on the best mask so far with a finer perturbation (default: 60 steps, 480 evaluations)"),
        samples: int = typer.Option(_D.samples, "--samples", "-S", help="masks sampled and evaluated per step (official: 2)"),
        seq_len: int = typer.Option(_D.seq_len, "--seq-len", help="tokens per calibration window"),
        batch_size: int = typer.Option(_D.batch_size, "--batch-size", "-b", help="calibration windows per step (official: 8)"),
        lr: Optional[float] = typer.Option(_D.lr, "--lr", help="learning rate (units: of θ, official 6e-3; allocation: Adam on the per-layer offsets' coefficients, default 0.02)"),
        schedule: str = typer.Option(_D.schedule, "--schedule", help="cosine | constant"),
        baseline: str = typer.Option(_D.baseline, "--baseline", help="moving-average (official: b ← 0.8 b + 0.2 mean loss) | leave-one-out"),
        init: Optional[str] = typer.Option(_D.init, "--init", help="the starting mask and prior: auto (allocation's default: besa or flap, the one whose mask written as the output will be is better on the held-in windows; besa unless flap is better beyond noise) | besa | wanda-sp (units' default, official) | flap | loraprune | magnitude | uniform"),
        rank: str = typer.Option(_D.rank, "--rank", help="allocation: what ranks the units inside each layer: flap (default) | init (the init method's scores) | wanda-sp"),
        sigma: float = typer.Option(_D.sigma, "--sigma", help="allocation: perturbation scale of the per-layer offsets, a fraction of a layer's channels"),
        group_every: int = typer.Option(_D.group_every, "--group-every", help="allocation: every N-th step explores single-layer KV-group moves (0: keep the init's groups)"),
        bias_compensation: bool = typer.Option(_D.bias_compensation, "--bias-compensation/--no-bias-compensation", help="judge masks during the search with FLAP's output biases from calibration means (and, with --no-reconstruct, write the model with them)"),
        reconstruct: bool = typer.Option(_D.reconstruct, "--reconstruct/--no-reconstruct", help="the written model and the reported perplexities refit o_proj/down_proj by damped least squares on the calibration windows (--init-windows x --init-seq-len); the search still judges masks with bias compensation"),
        incumbent_every: int = typer.Option(_D.incumbent_every, "--incumbent-every", help="every N steps the current mask challenges the best so far on held-in windows; the output is the best (0: off, output the last mask)"),
        objective: Optional[str] = typer.Option(_D.objective, "--objective", help="what a mask's loss is: soft (cross-entropy against the dense model's next-token distribution: KL to it plus a constant, lower variance; allocation's default) | nll (the text's next token, official)"),
        basis: int = typer.Option(_D.basis, "--basis", help="allocation: the channel offsets as this many smooth profiles over depth (0: one free offset per layer)"),
        optimizer: str = typer.Option(_D.optimizer, "--optimizer", help="allocation: adam (per-coordinate steps) | sgd (steps along the per-step normalised gradient)"),
        sampling: str = typer.Option(_D.sampling, "--sampling", help="allocation: antithetic (pairs a ± σε, the pair its own baseline) | independent (draws a + σε, each against the mean of the others on the same batch)"),
        attention_units: str = typer.Option(_D.attention_units, "--attention-units", help="allocation: what attention gives up: groups (whole KV groups with their query heads, default) | heads (query-head slots: head j of every KV group of a layer, so layers stay regular GQA; groups are kept, their k/v rows are a layer's fixed attention cost; ranked by FLAP's fluctuation)"),
        selection_windows: int = typer.Option(_D.selection_windows, "--selection-windows", help="held-in calibration windows that judge the incumbent (never used by the gradient)"),
        init_windows: int = typer.Option(_D.init_windows, "--init-windows", help="calibration windows of the init method, the bias statistics and the output's reconstruction"),
        init_seq_len: int = typer.Option(_D.init_seq_len, "--init-seq-len", help="tokens per --init-windows window"),
        seed: int = typer.Option(_D.seed, "--seed", help="seeds the data order, the wanda-sp windows and mask sampling"),
        dtype: str = typer.Option(_D.dtype, "--dtype", help="auto (the model in float32, masks judged in bfloat16 "
                                  "where the CPU or GPU has it natively) | float32 | bfloat16 | float16"),
        device: str = typer.Option(_D.device, "--device", help="cpu | cuda"),
        device_map: Optional[str] = typer.Option(_D.device_map, "--device-map", help="'auto': spread the layers over the GPUs of a node (models too large for one GPU)"),
        engine: str = typer.Option(_D.engine, "--engine", help="batched (bpp.MaskedModel: S masks in one pass) | hooks (one Hugging Face forward per mask, the ground truth)"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: pruned-<model>-<sparsity>)"),
        force: bool = typer.Option(False, "--force", help="overwrite the output folder's bpp files if it exists"),
        resume: Optional[Path] = typer.Option(None, "--resume", help="continue the interrupted run in this folder (options not given are taken from it)"),
        checkpoint_every: int = typer.Option(20, "--checkpoint-every", help="write a checkpoint every N steps (0: only at the start and end)"),
        eval_windows: Optional[int] = typer.Option(None, "--eval-windows", help="at most this many held-out windows per perplexity (default: all)"),
        eval_seq_len: int = typer.Option(128, "--eval-seq-len", help="held-out perplexity window length"),
        evaluate: bool = typer.Option(True, "--eval/--no-eval", help="held-out perplexity of dense, init and final masks"),
        export: Optional[str] = typer.Option(None, "--export", help="also write the compacted model for a serving runtime: gguf (OUT/model.gguf, for llama.cpp)"),
        export_dtype: str = typer.Option("f32", "--export-dtype", help="GGUF weights: f32 | f16 | bf16 | q8_0"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ):
        """Prune a model by policy gradient (arXiv 2406.10576); with no options, the embedded default at 20%
        (the allocation policy; --policy units for the official method)."""
        from ..errors import BppError
        from ..jobs.prune import prune

        if resume is not None and out is not None and Path(out) != Path(resume):
            raise BppError("--resume continues in its own folder; do not also pass a different --out")
        fields = PruneConfig.__dataclass_fields__
        job_options = ("checkpoint_every", "eval_windows", "eval_seq_len", "evaluate", "export", "export_dtype")
        # a new run takes every option; a resumed one only those typed (the run's own must agree,
        # its evaluation options are replaced)
        if resume is not None:
            options = given_on_command_line(ctx, (*fields, *job_options))
        else:
            options = {k: v for k, v in ctx.params.items() if k in fields or k in job_options}
        target = resume if resume is not None else out
        report = prune(out=target, force=force, resume=resume is not None, progress=not quiet, **options)
        if report.get("rank", 0) != 0:  # torchrun: rank 0 reports
            return
        ppl = report["perplexity"]
        final = report["params"]["final_mask"]
        typer.echo(f"pruned to {final['params']:,} parameters ({final['sparsity_of_model']:.1%} of the model removed) "
                   f"in {report['timings_s']['policy_gradient']:.0f}s of policy gradient; output in {report['out']}")
        if "final_mask" in ppl:
            parts = [f"{k.replace('_', ' ')} {ppl[k]:.3f}" for k in ("dense", "init_mask", "final_mask") if k in ppl]
            typer.echo(f"held-out perplexity (seq_len {ppl['seq_len']}): " + ", ".join(parts))
        exported = report.get("export")
        if exported:
            typer.echo(f"GGUF for llama.cpp: {exported['path']}" if exported["path"] else
                       f"GGUF export failed: {exported['error']}")
