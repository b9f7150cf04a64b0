"""`bpp prune --init auto`: the search starts from BESA's or FLAP's mask, whichever is better as
the run will write it (judged on the incumbent's held-in windows by the incumbent's rule), and is
then the very run `--init <that method>` makes; the choice is recorded, survives a resume, and is
judged on the written model."""
import json
import math

import pytest
import torch

from bpp.errors import BppError
from bpp.evaluation import window_nll
from bpp.jobs.prune import prune
from bpp.jobs.report import write_report
from bpp.masks import Masks
from bpp.methods import AUTO_CANDIDATES, init_candidates
from bpp.search import PruneConfig
from bpp.search.objective import selection_windows
from tests.conftest import FAST_CLI, cli

FAST = dict(steps=6, samples=2, batch_size=1, seq_len=16, init_windows=2, init_seq_len=16, sparsity=0.3,
            selection_windows=4, incumbent_every=3, group_every=2)


def _run(tiny_llama_dir, tiny_llama_loaded, out, **kw):
    model, tok = tiny_llama_loaded
    return prune(PruneConfig(model=str(tiny_llama_dir), **{**FAST, **kw}), out, model=model, tokenizer=tok,
                 progress=False, eval_windows=2)


def test_candidates_and_the_error_for_an_unknown_init():
    assert init_candidates("auto") == AUTO_CANDIDATES == ("besa", "flap")
    assert init_candidates("flap") == ("flap",)
    with pytest.raises(BppError, match="unknown init 'bogus'; use one of uniform, .*, loraprune, auto$"):
        init_candidates("bogus")


def test_auto_is_the_run_of_the_method_it_chose(tiny_llama_dir, tiny_llama_loaded, tmp_path):
    report = _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "auto", init="auto")
    choice = report["init_choice"]
    assert choice["candidates"] == ["besa", "flap"] and choice["chosen"] in ("besa", "flap")
    assert report["init"] == choice["chosen"] and report["config"]["init"] == "auto"
    assert choice["compensation"] == "reconstruct" and choice["windows"] == FAST["selection_windows"]
    assert set(choice["held_in_perplexity"]) == {"besa", "flap"}
    assert all(math.isfinite(p) and p > 1 for p in choice["held_in_perplexity"].values())
    (challenge,) = choice["challenges"]
    assert challenge["candidate"] == "flap" and challenge["accepted"] == (choice["chosen"] == "flap")
    same = _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "named", init=choice["chosen"])
    assert same["init_choice"] is None and same["init"] == choice["chosen"]
    for name in ("init_mask.safetensors", "mask.safetensors"):
        assert Masks.load(tmp_path / "auto" / name) == Masks.load(tmp_path / "named" / name), name
    assert json.loads((tmp_path / "auto" / "allocation.json").read_text()) == \
        json.loads((tmp_path / "named" / "allocation.json").read_text())
    md, _ = write_report([tmp_path / "auto", tmp_path / "named"], tmp_path / "report")
    rows = [line for line in md.read_text().splitlines() if line.startswith("| auto") or line.startswith("| named")]
    assert f"PG init=auto→{choice['chosen']} " in rows[0] and f"PG init={choice['chosen']} " in rows[1]


@pytest.mark.parametrize("flap_better", [True, False], ids=["flap-better", "tie-keeps-besa"])
def test_the_choice_follows_the_incumbents_rule(tiny_llama_dir, tiny_llama_loaded, tmp_path, monkeypatch,
                                                flap_better):
    import bpp.evaluation

    calls = []

    def fake(model, ids, *a, **k):  # besa's start is judged first; flap's second
        calls.append(ids.shape)
        g = torch.Generator().manual_seed(0)
        base = 2.0 + torch.rand(ids.shape[0], generator=g, dtype=torch.float64)
        return base - 0.5 if flap_better and len(calls) == 2 else base

    monkeypatch.setattr(bpp.evaluation, "window_nll", fake)
    report = _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "run", init="auto", steps=2, incumbent_every=0)
    assert len(calls) == 2 and calls[0][0] == FAST["selection_windows"]  # the held-in windows, even without an incumbent
    assert report["init_choice"]["chosen"] == ("flap" if flap_better else "besa")
    monkeypatch.undo()
    named = _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "named", init=report["init"], steps=2, incumbent_every=0)
    assert Masks.load(tmp_path / "run" / "init_mask.safetensors") == Masks.load(tmp_path / "named" / "init_mask.safetensors")
    assert named["init_choice"] is None


def test_each_start_is_judged_as_written(tiny_llama_dir, tiny_llama_loaded, tmp_path):
    """Without compensation the written model is the masked one: the recorded held-in perplexity of
    each start is that of its own mask on the selection windows."""
    from bpp.models.hooks import hook_masks

    report = _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "run", init="auto", steps=2, reconstruct=False,
                  bias_compensation=False, objective="nll")
    choice = report["init_choice"]
    assert choice["compensation"] == "none"
    model, tok = tiny_llama_loaded
    config = PruneConfig(model=str(tiny_llama_dir), **FAST).validate()
    from bpp.data import load_text, tokenize, window_bos

    ids = selection_windows(tokenize(tok, load_text(config.data, "calib")), config, window_bos(model))
    own = Masks.load(tmp_path / "run" / "init_mask.safetensors")
    with torch.no_grad(), hook_masks(model, own):
        expected = math.exp(float(window_nll(model, ids).mean()))
    assert choice["held_in_perplexity"][choice["chosen"]] == pytest.approx(expected, rel=1e-9)


def test_a_resumed_auto_run_keeps_its_choice_and_ends_as_an_uninterrupted_one(tiny_llama_dir, tiny_llama_loaded,
                                                                              tmp_path, monkeypatch):
    ref = _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "ref", init="auto")
    out = tmp_path / "cut"

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("bpp.jobs.prune_steps.compacted_perplexity", stop)
        with pytest.raises(KeyboardInterrupt):
            _run(tiny_llama_dir, tiny_llama_loaded, out, init="auto")
    model, tok = tiny_llama_loaded
    resumed = prune(out=out, resume=True, model=model, tokenizer=tok, progress=False)
    assert resumed["sessions"] == 2 and resumed["init_choice"] == ref["init_choice"]
    assert Masks.load(out / "mask.safetensors") == Masks.load(tmp_path / "ref" / "mask.safetensors")


def test_cli_takes_auto_and_refuses_an_unknown_init(tiny_llama_dir, tmp_path):
    code, err = cli("prune", "--model", tiny_llama_dir, "--out", tmp_path / "a", *FAST_CLI, "--init", "auto")
    assert code == 0, err
    assert json.loads((tmp_path / "a" / "report.json").read_text())["init_choice"]["chosen"] in AUTO_CANDIDATES
    code, err = cli("prune", "--model", tiny_llama_dir, "--out", tmp_path / "b", *FAST_CLI, "--init", "nope")
    assert code != 0 and "unknown init 'nope'" in err and "auto" in err
    assert not (tmp_path / "b" / "config.json").exists()


def test_the_chosen_starts_refit_is_the_one_its_evaluation_uses(tiny_llama_dir, tiny_llama_loaded, tmp_path,
                                                                monkeypatch):
    """A refit per start and one for the output (when it is another mask): the init mask's
    evaluation reuses its start's; the report still gives every reconstruction error, and the
    starts are written with the compensation the run writes its output with."""
    import bpp.jobs.written as steps

    calls = []
    real = steps.reconstruct
    monkeypatch.setattr(steps, "reconstruct", lambda *a, **k: calls.append(1) or real(*a, **k))
    report = _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "run", init="auto")
    moved = Masks.load(tmp_path / "run" / "mask.safetensors") != Masks.load(tmp_path / "run" / "init_mask.safetensors")
    assert len(calls) == 2 + moved  # the output's refit too when the search moved off its start
    errors = report["reconstruction"]["mean_relative_error"]
    assert {"besa_start", "flap_start", "init_mask", "final_mask"} <= set(errors)
    assert errors["init_mask"] == errors[f"{report['init']}_start"]
    assert report["timings_s"]["evaluation"] >= 0 and report["timings_s"]["reconstruction"] >= 0
    bias = _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "bias", init="auto", reconstruct=False, steps=2)
    assert bias["init_choice"]["compensation"] == "bias" and bias["compensation"] == "bias"


def test_auto_with_layer_units_starts_from_the_first_candidates_prior_without_a_choice(tiny_llama_dir,
                                                                                       tiny_llama_loaded, tmp_path):
    """Layer units have no init mask to write and judge: auto then starts as its first candidate
    would and records no choice."""
    kw = dict(policy="units", granularity="layer", sparsity=0.5, steps=3, bias_compensation=False)
    auto = _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "auto", init="auto", **kw)
    named = _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "named", init=AUTO_CANDIDATES[0], **kw)
    assert auto["init_choice"] is None and auto["init"] == AUTO_CANDIDATES[0] == named["init"]
    assert Masks.load(tmp_path / "auto" / "mask.safetensors") == Masks.load(tmp_path / "named" / "mask.safetensors")
