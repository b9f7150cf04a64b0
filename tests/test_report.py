"""`bpp report`: runs written by `bpp prune` compared in one Markdown table and one plot."""
import json

import pytest

from bpp.jobs.prune import prune
from bpp.search import PruneConfig
from bpp.errors import BppError
from bpp.jobs.report import write_report
from tests.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    model_dir = root / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    runs = []
    for name, baseline in (("ma", "moving-average"), ("loo", "leave-one-out")):
        config = PruneConfig(model=str(model_dir), steps=4, samples=4, batch_size=2, seq_len=32, init_windows=4,
                             init_seq_len=32, sparsity=0.3, baseline=baseline)
        prune(config, root / name, eval_windows=3, progress=False, compact=False)
        runs.append(root / name)
    (root / "loo" / "zero_shot.json").write_text(json.dumps({"piqa": {"acc": 0.625}}))
    return runs


def test_report_compares_runs(two_runs, tmp_path):
    md, png = write_report(two_runs, tmp_path / "out")
    text = md.read_text()
    assert png.is_file() and png.stat().st_size > 1000
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(lines) == 3  # header + two runs
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert "piqa" in header and "ppl final" in header
    for run_dir, line in zip(two_runs, lines[1:]):
        report = json.loads((run_dir / "report.json").read_text())
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        assert cells["run"] == run_dir.name
        assert cells["ppl final"] == f"{report['perplexity']['final_mask']:.3f}"
        assert cells["params"] == f"{report['params']['final_mask']['params']:,}"
        assert "seq_len 128" in cells["ppl protocol"]
    assert "0.6250" in lines[2] and "leave-one-out" in lines[2] and "+reconstruct" in lines[2]


def test_report_cli_and_errors(two_runs, tmp_path):
    from typer.testing import CliRunner

    from bpp.cli import app

    result = CliRunner().invoke(app, ["report", *map(str, two_runs), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "report.md").is_file()
    with pytest.raises(BppError, match="no report.json"):
        write_report([tmp_path], tmp_path / "x")
