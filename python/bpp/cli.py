"""``bpp`` command line: prune | eval | compact | bench."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Optional

import typer
from rich.console import Console

from .errors import BppError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Structured pruning of LLMs by policy gradient (arXiv 2406.10576).")
console = Console(stderr=True)



@app.callback()
def _root() -> None:
    """Structured pruning of LLMs by policy gradient (arXiv 2406.10576)."""


ModelOpt = typer.Option(None, "--model", "-m", help="Local Hugging Face folder or hub id; default: embedded SmolLM2-135M-Instruct")
DataOpt = typer.Option("default", "--data", help="default | wikitext2 | c4 | ptb | path/to/file.txt")


@app.command("eval")
def eval_cmd(
    model: Optional[str] = ModelOpt,
    data: str = DataOpt,
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
    from . import load_model
    from .data import load_text
    from .evaluate import perplexity

    text = load_text(data, split)
    lm, tokenizer = load_model(model, dtype=dtype, device=device)
    ppl = perplexity(lm, tokenizer, text, seq_len=seq_len, batch_size=batch_size, progress=True)
    typer.echo(f"perplexity {ppl:.3f}  (model {model or 'default'}, data {data}/{split}, seq_len {seq_len})")
    if tasks:
        from .evaluate import ZERO_SHOT_TASKS, zero_shot

        names = list(ZERO_SHOT_TASKS) if tasks == "paper" else [t.strip() for t in tasks.split(",") if t.strip()]
        for task, row in zero_shot(lm, tokenizer, names, limit=limit, include_path=include_path).items():
            extra = f"  acc_norm {row['acc_norm']:.4f}" if "acc_norm" in row else ""
            typer.echo(f"{task:<16} acc {row.get('acc', float('nan')):.4f}{extra}  (n={row['n']}, {row['num_fewshot']}-shot)")


# Each further command lives in python/bpp/cli_<name>.py, which defines ``register(app)``.
for _name in ("prune", "baseline", "compact", "report", "recover"):
    if importlib.util.find_spec(f"{__package__}.cli_{_name}") is not None:
        importlib.import_module(f"{__package__}.cli_{_name}").register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors (BppError) print one line and exit 2, without a traceback."""
    try:
        app(args=argv)  # standalone: click prints usage errors itself and exits 2
    except BppError as e:
        console.print(f"[bold red]error:[/] {e}")
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
