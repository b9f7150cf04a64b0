"""``bpp report``: compare runs in one Markdown table and one plot."""
from __future__ import annotations

from pathlib import Path
from typing import List

import typer


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report_cmd(
        runs: List[Path] = typer.Argument(..., help="folders written by `bpp prune`"),
        out: Path = typer.Option(Path("bpp-report"), "--out", "-o", help="folder for report.md and report.png"),
        force: bool = typer.Option(False, "--force", help="replace the report an earlier `bpp report` wrote in --out"),
    ):
        """One Markdown + PNG summary comparing pruning runs (params, perplexities, zero-shot, time, masks/s)."""
        from ..jobs.report import write_report

        md, png = write_report(runs, out, force=force)
        typer.echo(md.read_text())
        typer.echo(f"written: {md}, {png}")
