"""The ``bpp`` command line: one thin file per command over the job functions of :mod:`bpp.jobs`.

User errors (:class:`bpp.BppError`) print one line and exit 2, without a traceback."""
from __future__ import annotations

import sys

import typer
from rich.console import Console

from ..errors import BppError
from ..fileio import write_error
from . import baseline, compact, eval, export, prune, recover, report

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Structured pruning of LLMs by policy gradient (arXiv 2406.10576).")
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Structured pruning of LLMs by policy gradient (arXiv 2406.10576)."""


for _command in (prune, baseline, compact, recover, export, eval, report):
    _command.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors (BppError) print one line and exit 2, without a traceback."""
    try:
        app(args=argv)  # standalone: click prints usage errors itself and exits 2
    except BppError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as e:  # a write or read the job did not foresee: one line, not a traceback
        console.print(f"[bold red]error:[/] {write_error(e, getattr(e, 'filename', None) or 'a file')}",
                      highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
