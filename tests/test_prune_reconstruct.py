"""`bpp prune`'s output reconstruction: the option on the command line, a run stopped while it
refits (or evaluates) resumes to the end, and a run saved before the option existed resumes as it
was made (FLAP's biases, no refit)."""
import json

import pytest

from bpp.checkpoints import load_checkpoint, save_checkpoint
from bpp.errors import BppError
from bpp.jobs.prune import prune
from bpp.masks import Masks
from bpp.search import PruneConfig
from tests.conftest import FAST_CLI, cli

FAST = dict(steps=4, samples=2, batch_size=1, seq_len=16, init_windows=2, init_seq_len=16, sparsity=0.3,
            selection_windows=2, incumbent_every=2)


def _stop(*args, **kwargs):
    raise KeyboardInterrupt  # what a kill leaves: the final checkpoint written, no report


def test_from_dict_reads_a_config_saved_without_reconstruct_as_made_without_it():
    saved = PruneConfig().to_dict()
    del saved["reconstruct"]
    assert PruneConfig.from_dict(saved).reconstruct is False
    assert PruneConfig().reconstruct is True
    assert PruneConfig.from_dict(PruneConfig().to_dict()).reconstruct is True


def test_cli_no_reconstruct_writes_the_bias_compensated_model(tiny_llama_dir, tmp_path):
    code, err = cli("prune", "--model", tiny_llama_dir, "--out", tmp_path / "b", *FAST_CLI, "--no-reconstruct")
    assert code == 0, err
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["config"]["reconstruct"] is False and report["compensation"] == "bias"
    assert json.loads((tmp_path / "b" / "model" / "bpp_compaction.json").read_text())["bias_compensation"]
    code, err = cli("prune", "--model", tiny_llama_dir, "--out", tmp_path / "r", *FAST_CLI)
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["config"]["reconstruct"] is True and report["compensation"] == "reconstruct"
    assert json.loads((tmp_path / "r" / "model" / "bpp_compaction.json").read_text())["reconstructed"]


def test_a_run_stopped_during_reconstruction_resumes_to_the_end(tiny_llama_dir, tiny_llama_loaded, tmp_path,
                                                                monkeypatch):
    model, tok = tiny_llama_loaded
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr("bpp.jobs.written.reconstruct", _stop)
        with pytest.raises(KeyboardInterrupt):  # (one start: --init auto refits its candidates before the search)
            prune(PruneConfig(model=str(tiny_llama_dir), init="besa", **FAST), out, model=model, tokenizer=tok,
                  progress=False, eval_windows=2)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4 and not (out / "report.json").exists()
    stopped_mask = Masks.load(out / "mask.safetensors")
    report = prune(out=out, resume=True, model=model, tokenizer=tok, progress=False)
    assert report["sessions"] == 2 and report["steps_done"] == 4 and report["compensation"] == "reconstruct"
    assert Masks.load(out / "mask.safetensors") == stopped_mask
    assert report["perplexity"]["final_mask"] > 1
    assert json.loads((out / "model" / "bpp_compaction.json").read_text())["reconstructed"]


def test_a_run_saved_before_reconstruct_existed_resumes_with_bias_compensation(tiny_llama_dir, tiny_llama_loaded,
                                                                               tmp_path, monkeypatch):
    model, tok = tiny_llama_loaded
    out = tmp_path / "old"
    with monkeypatch.context() as m:
        m.setattr("bpp.jobs.prune_steps.compacted_perplexity", _stop)
        with pytest.raises(KeyboardInterrupt):
            prune(PruneConfig(model=str(tiny_llama_dir), reconstruct=False, **FAST), out, model=model,
                  tokenizer=tok, progress=False, eval_windows=2)
    # the files as a version without the option wrote them
    state = load_checkpoint(out / "checkpoint.pt")
    del state["config"]["reconstruct"]
    save_checkpoint(state, out / "checkpoint.pt")
    config = json.loads((out / "config.json").read_text())
    del config["reconstruct"]
    (out / "config.json").write_text(json.dumps(config))

    with pytest.raises(BppError, match="--reconstruct: True given, the run has False"):
        prune(out=out, resume=True, model=model, tokenizer=tok, progress=False, reconstruct=True)
    code, err = cli("prune", "--resume", out, "--quiet")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["reconstruct"] is False and report["compensation"] == "bias"
    assert report["sessions"] == 2 and "final_mask" in report["perplexity"]
    record = json.loads((out / "model" / "bpp_compaction.json").read_text())
    assert record["bias_compensation"] and not record["reconstructed"]
