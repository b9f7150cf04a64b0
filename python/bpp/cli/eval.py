"""``bpp eval``: perplexity of a model on held-out text, and optionally zero-shot accuracy."""
from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Local Hugging Face folder or hub id; default: embedded SmolLM2-135M-Instruct"),
        data: str = typer.Option("default", "--data", help="default | wikitext2 | c4 | ptb | path/to/file.txt"),
        split: str = typer.Option("heldout", help="calib | heldout | all"),
        seq_len: int = typer.Option(128, "--seq-len", help="window length in tokens (128: LLM-Pruner/FLAP; 2048: SparseGPT/Wanda)"),
        batch_size: int = typer.Option(8, "--batch-size"),
        dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
        device: str = typer.Option("cpu", help="cpu | cuda"),
        tasks: Optional[str] = typer.Option(None, help="also zero-shot accuracy via lm-eval: comma-separated task names, or 'paper' for boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"),
        limit: Optional[int] = typer.Option(None, help="at most this many samples per task (smoke runs)"),
        include_path: Optional[str] = typer.Option(None, "--include-path", help="folder of extra lm-eval task YAML files"),
    ):
        """Perplexity of a model on held-out text (non-overlapping windows), and optionally zero-shot accuracy."""
        from ..jobs.eval import evaluate_model

        result = evaluate_model(model, data=data, split=split, seq_len=seq_len, batch_size=batch_size, dtype=dtype,
                          device=device, tasks=tasks, limit=limit, include_path=include_path)
        typer.echo(f"perplexity {result['perplexity']:.3f}  (model {model or 'default'}, data {data}/{split}, "
                   f"seq_len {seq_len})")
        for task, row in result.get("zero_shot", {}).items():
            extra = f"  acc_norm {row['acc_norm']:.4f}" if "acc_norm" in row else ""
            typer.echo(f"{task:<16} acc {row.get('acc', float('nan')):.4f}{extra}  (n={row['n']}, {row['num_fewshot']}-shot)")
