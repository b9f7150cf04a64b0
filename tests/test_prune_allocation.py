"""`bpp prune` with the allocation policy, bias compensation and the incumbent: end to
end on a tiny model, the incumbent's monotonicity, option checks, and kill -9 / resume bit for bit."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from bpp.jobs.prune import prune
from bpp.search import PruneConfig
from bpp.errors import BppError
from bpp.masks import Masks
from bpp.search.incumbent import Incumbent
from bpp.space import MaskSpace
from tests.conftest import REPO, kill_9_at_checkpoint, prune_cmd

FAST = dict(steps=12, samples=4, batch_size=2, seq_len=32, init_windows=4, init_seq_len=32, sparsity=0.3,
            selection_windows=4, incumbent_every=3, group_every=3)


def _run(tiny_llama_dir, tiny_llama_loaded, out, **kw):
    model, tok = tiny_llama_loaded
    return prune(PruneConfig(model=str(tiny_llama_dir), **{**FAST, **kw}), out, model=model, tokenizer=tok,
                 progress=False, eval_windows=3)


@pytest.mark.parametrize("reconstruct", [True, False], ids=["reconstruct", "bias"])
def test_default_run_writes_the_incumbent_and_its_compensated_compacted_model(tiny_llama_dir, tiny_llama_loaded,
                                                                              tmp_path, reconstruct):
    out = tmp_path / "run"
    report = _run(tiny_llama_dir, tiny_llama_loaded, out, reconstruct=reconstruct)
    assert report["config"]["policy"] == "allocation" and report["config"]["init"] == "auto"
    assert report["init"] == report["init_choice"]["chosen"] in ("besa", "flap")
    for name in ("mask.safetensors", "init_mask.safetensors", "allocation.json", "bias_compensation.safetensors",
                 "metrics.jsonl", "report.json", "loss_curve.png", "kept_per_layer.png"):
        assert (out / name).is_file(), name
    inc = report["incumbent"]
    assert inc["challenges"] == 4 and 0 <= inc["last_changed_at_step"] <= 12  # steps 3, 6, 9, 12
    mask, init = Masks.load(out / "mask.safetensors"), Masks.load(out / "init_mask.safetensors")
    if inc["accepted"] == 0:
        assert mask == init and inc["last_changed_at_step"] == 0
    space = MaskSpace.from_model(tiny_llama_loaded[0])
    target = (1 - 0.3) * space.prunable_params
    kept = int(mask.channels.sum()) * space.channel_params + int(mask.groups.sum()) * space.group_params
    assert kept <= target + 1e-6
    # every sampled mask of the run had the same parameter count as its centre (the shift)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"channel", "group"}
    assert [r["step"] for r in records] == list(range(12)) and records[-1]["evaluations"] > 0
    assert all("selection" in r for r in records if (r["step"] + 1) % 3 == 0)
    # the written model is the incumbent compacted with its compensation (refit or FLAP's biases), and
    # the report's perplexity is that model's
    from transformers import AutoModelForCausalLM

    from bpp.bias_compensation import BiasCompensation
    from bpp.evaluation import perplexity

    small = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True)
    record = json.loads((out / "model" / "bpp_compaction.json").read_text())
    assert (record["reconstructed"], record["bias_compensation"]) == (reconstruct, not reconstruct)
    kind = "reconstruct" if reconstruct else "bias"
    assert report["compensation"] == report["perplexity"]["compensation"] == kind
    if reconstruct:
        rec = report["reconstruction"]
        assert rec["damping"] == "auto" and (rec["calib_windows"], rec["calib_seq_len"]) == (4, 32)
        assert set(rec["mean_relative_error"]) == {"init_mask", "final_mask", "besa_start", "flap_start"}
        for errors in rec["mean_relative_error"]["final_mask"].values():
            assert errors["refit"] <= errors["bias"] + 1e-9 and errors["layers"] >= 1
        assert report["timings_s"]["reconstruction"] > 0
    else:
        assert "reconstruction" not in report and report["timings_s"]["reconstruction"] == 0
    held = __import__("bpp.data", fromlist=["x"])
    ids = held.tokenize(tiny_llama_loaded[1], held.load_text("default", "heldout"))
    ppl = perplexity(small, tiny_llama_loaded[1], ids, seq_len=128, max_windows=3)
    assert abs(ppl - report["perplexity"]["final_mask"]) < 1e-3 * report["perplexity"]["final_mask"]
    comp = BiasCompensation.load(tiny_llama_loaded[0], out / "bias_compensation.safetensors")
    assert len(comp.attn_means) == space.n_layers


@pytest.mark.parametrize("init", ["wanda-sp", "besa"])
def test_other_inits_and_ranks_run(tiny_llama_dir, tiny_llama_loaded, tmp_path, init):
    report = _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / init, init=init,
                  rank="init" if init == "besa" else "flap", steps=6)
    assert report["steps_done"] == 6 and "init_mask" in report["perplexity"]


def test_independent_sampling_runs(tiny_llama_dir, tiny_llama_loaded, tmp_path):
    report = _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "ind", sampling="independent", samples=3, steps=4,
                  group_every=0)
    lines = [json.loads(x) for x in (tmp_path / "ind" / "metrics.jsonl").read_text().splitlines()]
    assert report["steps_done"] == 4 and all(r["evaluated"] == 3 and len(r["grad"]) > 0 for r in lines)


def test_sgd_optimizer_runs(tiny_llama_dir, tiny_llama_loaded, tmp_path):
    report = _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "sgd", optimizer="sgd", steps=4, group_every=0)
    assert any(abs(x) > 0 for x in report["allocation"]["offsets"])


def test_units_policy_keeps_an_incumbent_too(tiny_llama_dir, tiny_llama_loaded, tmp_path):
    report = _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "u", policy="units", init="flap", steps=6)
    assert report["incumbent"]["challenges"] == 2 and (tmp_path / "u" / "theta.safetensors").is_file()


def test_incumbent_never_gets_worse_on_its_selection_windows():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 2, 5, generator=g) < 0.5
    start = Masks(base, torch.ones(1, 2, 2, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool))
    inc = Incumbent(start, torch.rand(16, generator=g, dtype=torch.float64) + 3.0)
    losses = [inc.loss]
    for step in range(1, 200):
        mask = Masks(torch.rand(1, 2, 5, generator=g) < 0.5, start.groups, start.layers)
        # challengers: noisy, sometimes better, sometimes worse, per window
        challenger = inc.window_losses + 0.05 * torch.randn(16, generator=g, dtype=torch.float64) \
            + 0.02 * float(torch.randn(1, generator=g))
        record = inc.challenge(mask, challenger, step)
        losses.append(inc.loss)
        if record["accepted"]:
            assert record["mean_difference"] < -inc.z * record["standard_error"] and inc.changed_at == step
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    assert 0 < sum(h["accepted"] for h in inc.history) < 199
    # the same mask never "replaces" itself, and a worse one never does
    assert not inc.challenge(inc.mask, inc.window_losses - 1.0, 500)["accepted"]
    other = Masks(~inc.mask.channels, inc.mask.groups, inc.mask.layers)
    assert not inc.challenge(other, inc.window_losses + 0.01, 501)["accepted"]


def test_incumbent_in_a_run_is_monotone(tiny_llama_dir, tiny_llama_loaded, tmp_path):
    report = _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "m", incumbent_every=1, steps=10, sigma=0.2)
    history = report["incumbent"]["history"]
    best = [min(h["incumbent_loss"], h["challenger_loss"]) if h["accepted"] else h["incumbent_loss"] for h in history]
    assert all(b <= a + 1e-12 for a, b in zip(best, best[1:]))
    assert report["incumbent"]["selection_loss"] == pytest.approx(best[-1])


@pytest.mark.parametrize("changes, message", [
    (dict(policy="neurons"), "unknown policy"),
    (dict(rank="random"), "unknown rank"),
    (dict(sigma=0.0), "--sigma must be positive"),
    (dict(samples=3), "must be even"),
    (dict(budget="count"), "one parameter budget"),
    (dict(granularity="channel"), "learns channels and KV groups together"),
    (dict(init="uniform"), "--init uniform has none"),
    (dict(group_every=-1), "--group-every must be 0"),
    (dict(selection_windows=1), "--selection-windows must be at least 2"),
    (dict(selection_windows=100000), "too little calibration text"),
    (dict(objective="kl"), "unknown objective"),
    (dict(optimizer="lbfgs"), "unknown optimizer"),
    (dict(sampling="sobol"), "unknown sampling"),
    (dict(basis=1), "--basis must be 0"),
    (dict(engine="hooks"), "pass --objective nll"),
])
def test_bad_allocation_options(tiny_llama_dir, tiny_llama_loaded, tmp_path, changes, message):
    with pytest.raises(BppError, match=message):
        _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "bad", **changes)


def test_cli_errors_are_one_line(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from bpp.cli import app

    result = CliRunner().invoke(app, ["prune", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "x"),
                                      "--policy", "allocation", "--samples", "5", "--quiet"])
    assert isinstance(result.exception, BppError) and "\n" not in str(result.exception)


def test_custom_losses_without_compensation_are_refused(tiny_llama_dir, tiny_llama_loaded, tmp_path):
    model, tok = tiny_llama_loaded
    fn = lambda ids, masks: torch.zeros(masks.S)  # noqa: E731
    with pytest.raises(BppError, match="objective='nll'"):
        prune(PruneConfig(model=str(tiny_llama_dir), **FAST), tmp_path / "c", model=model, tokenizer=tok,
              progress=False, losses_fn=fn)
    with pytest.raises(BppError, match="without bias compensation"):
        prune(PruneConfig(model=str(tiny_llama_dir), objective="nll", **FAST), tmp_path / "c", model=model,
              tokenizer=tok, progress=False, losses_fn=fn)


def test_allocation_kill_9_then_resume_equals_an_uninterrupted_run(tiny_llama_dir, tmp_path):
    """The allocation state (offsets, groups, Adam, group statistics, move queue, incumbent, bias
    compensation) survives kill -9 bit for bit."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    extra = ("--steps", "300", "--samples", "2", "--incumbent-every", "20", "--selection-windows", "4",
             "--group-every", "3", "--sigma", "0.2")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(prune_cmd(tiny_llama_dir, ref, *extra), check=True, env=env, cwd=REPO, capture_output=True,
                   timeout=300)
    proc = subprocess.Popen(prune_cmd(tiny_llama_dir, cut, *extra), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = kill_9_at_checkpoint(proc, cut / "checkpoint.pt", 60, finished=cut / "mask.safetensors")
    assert proc.returncode == -signal.SIGKILL
    assert 60 <= killed_at < 300 and not (cut / "mask.safetensors").exists()
    subprocess.run([sys.executable, "-m", "bpp", "prune", "--resume", str(cut), "--quiet"], check=True, env=env,
                   cwd=REPO, capture_output=True, timeout=300)
    a, b = json.loads((cut / "allocation.json").read_text()), json.loads((ref / "allocation.json").read_text())
    assert a == b
    assert Masks.load(cut / "mask.safetensors") == Masks.load(ref / "mask.safetensors")
    lines = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "masks_per_s")}  # noqa: E731
    cut_records = lines(cut)
    assert [r["step"] for r in cut_records] == list(range(300))
    assert [strip(r) for r in cut_records if "selection" not in r] == \
        [strip(r) for r in lines(ref) if "selection" not in r]
    rc, rr = json.loads((cut / "report.json").read_text()), json.loads((ref / "report.json").read_text())
    assert rc["sessions"] == 2
    drop = lambda h: [{k: v for k, v in x.items() if k != "seconds"} for x in h]  # noqa: E731
    assert drop(rc["incumbent"]["history"]) == drop(rr["incumbent"]["history"])
    assert any(abs(x) > 0 for x in a["offsets"])  # the policy moved, so equality is not the init's


def test_compact_cli_uses_the_runs_own_compensation(tiny_llama_dir, tiny_llama_loaded, tmp_path):
    from typer.testing import CliRunner

    from bpp.cli import app

    out = tmp_path / "run"
    _run(tiny_llama_dir, tiny_llama_loaded, out, steps=3, reconstruct=False)
    result = CliRunner().invoke(app, ["compact", "--mask", str(out / "mask.safetensors"), "--out", str(tmp_path / "c"),
                                      "--model", str(tiny_llama_dir), "--bias-compensation", "--calib-windows", "2"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    record = json.loads((tmp_path / "c" / "bpp_compaction.json").read_text())
    assert record["bias_compensation_means"] == str(out / "bias_compensation.safetensors")
    a = dict(__import__("safetensors.torch", fromlist=["x"]).load_file(str(tmp_path / "c" / "model.safetensors")))
    b = dict(__import__("safetensors.torch", fromlist=["x"]).load_file(str(out / "model" / "model.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the very model prune wrote
