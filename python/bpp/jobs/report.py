"""``bpp report DIR...``: one Markdown table and one PNG comparing pruning runs.

Reads each run's ``report.json`` (written by ``bpp prune``) and, when present, a
``zero_shot.json`` beside it (``{task: {"acc": ..}}``, as :func:`bpp.evaluation.zero_shot` returns).
The output folder is a run folder (:mod:`bpp.runs`): an existing report is replaced only with
``force``, one writer at a time, every file written atomically.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import BppError
from ..fileio import atomic_write, atomic_write_text, read_json, write_error
from ..runs import RunFolder

OUTPUT_FILES = ("report.md", "report.png")


def load_run(path: str | Path) -> dict:
    path = Path(path)
    report_file = path / "report.json" if path.is_dir() else path
    if not report_file.is_file():
        raise BppError(f"{path} has no report.json: give folders written by `bpp prune`")
    report = read_json(report_file, "a bpp report")
    zero_shot = report_file.parent / "zero_shot.json"
    if zero_shot.is_file():
        report["zero_shot"] = read_json(zero_shot, "a zero-shot result")
    report["_name"] = report_file.parent.name
    return report


def _row(r: dict) -> dict:
    c, p, t = r.get("config", {}), r.get("params", {}), r.get("timings_s", {})
    final = p.get("final_mask") or {}
    ppl = r.get("perplexity", {})
    steps = r.get("steps_done") or 0
    pg = t.get("policy_gradient") or 0.0
    masks_per_s = steps * c.get("samples", 0) / pg if pg else None
    return {
        "run": r["_name"],
        "method": (c["method"] + (" +reconstruct" if c.get("compensation") == "reconstruct" else
                                  " +bias" if c.get("bias_compensation") else "")) if "method" in c else
        f"PG init={_init(c, r)} S={c.get('samples')} {c.get('baseline')} budget={c.get('budget')}"
        + (f" +{r['compensation']}" if r.get("compensation") not in (None, "none") else ""),
        "sparsity": c.get("sparsity"),
        "params": final.get("params"),
        "ppl_dense": ppl.get("dense"),
        "ppl_init": ppl.get("init_mask"),
        "ppl_final": ppl.get("final_mask"),
        "ppl_protocol": f"{ppl.get('data', '?')}, seq_len {ppl.get('seq_len', '?')}",
        "wall_s": t.get("total_this_session"),
        "masks_per_s": masks_per_s,
        "zero_shot": {k: v.get("acc") for k, v in (r.get("zero_shot") or {}).items()},
    }


def _init(config: dict, report: dict) -> str:
    """The run's init: ``auto→flap`` where ``--init auto`` chose."""
    chosen = report.get("init")
    return f"{config.get('init')}→{chosen}" if chosen and chosen != config.get("init") else str(config.get("init"))


def _fmt(x, spec=".3f"):
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def markdown(runs: list[dict]) -> str:
    rows = [_row(r) for r in runs]
    tasks = sorted({t for row in rows for t in row["zero_shot"]})
    head = ["run", "method", "sparsity", "params", "ppl dense", "ppl init", "ppl final", "ppl protocol",
            *tasks, "wall (s)", "masks/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["run"], row["method"], _fmt(row["sparsity"], "g"), _fmt(row["params"], ","),
                 _fmt(row["ppl_dense"]), _fmt(row["ppl_init"]), _fmt(row["ppl_final"]), row["ppl_protocol"],
                 *(_fmt(row["zero_shot"].get(t), ".4f") for t in tasks), _fmt(row["wall_s"], ".0f"),
                 _fmt(row["masks_per_s"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [_row(r) for r in runs]
    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        if row["params"] is not None and row["ppl_final"] is not None:
            ax.scatter(row["params"] / 1e6, row["ppl_final"], s=30)
            ax.annotate(row["run"], (row["params"] / 1e6, row["ppl_final"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("parameters after pruning (M)")
    ax.set_ylabel("held-out perplexity (final mask)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_report(dirs: list[str | Path], out: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """``out/report.md`` and ``out/report.png`` comparing the runs in ``dirs``. ``out`` must be new
    or empty, or (with ``force``) a folder an earlier ``bpp report`` wrote."""
    if not dirs:
        raise BppError("give at least one run folder")
    out = Path(out)
    local = tuple(Path(d) for d in dirs)
    folder = RunFolder(out, "report")
    folder.check(force=force, protected=local)  # before reading anything
    runs = [load_run(d) for d in dirs]
    ok = False
    try:
        folder.open(force=force, protected=local)
        folder.claim(force=force, files=OUTPUT_FILES)
        md, png = out / "report.md", out / "report.png"
        atomic_write_text(md, "# bpp runs\n\n" + markdown(runs) + "\n![perplexity vs parameters](report.png)\n")
        plot(runs, png)
        ok = True
    except OSError as e:
        raise write_error(e, out) from None
    finally:
        folder.close(ok)
    return md, png
