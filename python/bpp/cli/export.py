"""``bpp export``: a compacted model folder → a file a serving runtime runs (GGUF for llama.cpp)."""
from __future__ import annotations

from pathlib import Path

import typer

FORMATS = ("gguf",)
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        model: Path = typer.Argument(..., help="the compacted model folder (bpp compact output, or a bpp prune / bpp baseline folder holding model/)"),
        out: Path = typer.Option(..., "--out", "-o", help="the file to write, e.g. small.gguf"),
        format: str = typer.Option("gguf", "--format", help="gguf (llama.cpp: per-layer sizes as its 'deci' architecture)"),
        dtype: str = typer.Option("f32", "--dtype", help="f32 | f16 | bf16 | q8_0 (q8_0 needs widths that are multiples of 32: bpp compact --round-to 32)"),
        force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ):
        """Write a pruned model in a format serving runtimes run: GGUF for llama.cpp and the tools built on it."""
        from ..errors import BppError
        from ..jobs.export import export_gguf

        if format not in FORMATS:
            raise BppError(f"unknown format {format!r}; bpp exports {', '.join(FORMATS)}")
        path = export_gguf(model, out, dtype=dtype, force=force, progress=not quiet)
        typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {dtype}); run it with llama.cpp, "
                   f"e.g. llama-cli -m {path}")
