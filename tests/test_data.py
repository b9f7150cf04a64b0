"""Text sources (the embedded default, files, hub corpora) and calibration windows."""
import pytest
import torch

from bpp import data
from bpp.errors import BppError


def test_default_text_split_is_deterministic_disjoint_and_complete():
    calib, held, everything = (data.load_text("default", s) for s in ("calib", "heldout", "all"))
    assert calib == data.load_text("default", "calib")
    assert 0.05 < len(held) / len(everything) < 0.2
    # every paragraph lands in exactly one split (paragraph counts add up, contents cover all)
    n_calib, n_held, n_all = (len(t.split("\n\n")) for t in (calib, held, everything))
    assert n_calib + n_held == n_all
    assert set(calib.split("\n\n")) | set(held.split("\n\n")) == set(everything.split("\n\n"))


def test_text_file_and_errors(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n".join(f"line {i} of text" for i in range(100)))
    calib, held = data.load_text(str(path), "calib"), data.load_text(str(path), "heldout")
    assert calib + held == path.read_text() and len(held) < len(calib)
    with pytest.raises(BppError, match="not found"):
        data.load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(BppError, match="unknown data 'nope'"):
        data.load_text("nope")
    with pytest.raises(BppError, match="unknown split"):
        data.load_text("default", "train")


def test_hub_loaders_use_the_standard_configs(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, data_files=None):
        calls.append((path, name, split, data_files))
        field = "sentence" if path == "ptb_text_only" else "text"
        return datasets.Dataset.from_dict({field: [f"{path} {split} doc {i}" for i in range(1500)]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    wiki = data.load_text("wikitext2", "heldout")
    assert calls[-1][:3] == ("wikitext", "wikitext-2-raw-v1", "test") and wiki.count("\n\n") == 1499
    assert data.load_text("ptb", "calib").startswith("ptb_text_only train doc 0 ptb_text_only")
    c4 = data.load_text("c4", "heldout")
    assert calls[-1][0] == "allenai/c4" and "c4-validation.00000-of-00008" in str(calls[-1][3])
    assert c4.count("doc") == 1100  # the SparseGPT convention: first 1100 validation documents


def test_hub_loader_failure_is_one_clear_message(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(BppError, match="could not load wikitext.*--data default"):
        data.load_text("wikitext2", "heldout")


def test_windows(tokenizer):
    text = data.load_text("default", "heldout")
    a = data.windows(tokenizer, text, seq_len=32, n=5, seed=3)
    assert a.shape == (5, 32) and a.dtype == torch.int64
    assert torch.equal(a, data.windows(tokenizer, text, 32, 5, seed=3))
    assert not torch.equal(a, data.windows(tokenizer, text, 32, 5, seed=4))
    ids = data.tokenize(tokenizer, text)
    row = a[0].tolist()
    assert any(ids[i : i + 32].tolist() == row for i in range(ids.numel() - 31))
    with pytest.raises(BppError, match="fewer than seq_len"):
        data.windows(tokenizer, "short text", seq_len=64, n=1)
