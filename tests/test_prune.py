"""`bpp prune` end to end on a tiny model: outputs, bad inputs, NaN handling, the wanda-sp
initialisation, and checkpoint/resume after kill -9."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bpp.jobs.prune import prune
from bpp.search import PruneConfig, SearchLoop
from bpp.search.config import learning_rate
from bpp.errors import BppError
from bpp.methods import initialise
from bpp.models.replay import layer_inputs, run_layer
from bpp.methods.ranking import per_layer_counts, sigmap
from bpp.models.hooks import hook_losses
from bpp.budget import Budget
from bpp.masks import Masks
from bpp.search.units import UnitsPolicy
from bpp.space import MaskSpace
from tests.conftest import kill_9_at_checkpoint, prune_cmd
from tests.tiny import tiny_model

REPO = Path(__file__).resolve().parents[1]
# a small but complete run: 2 layers, 70 channels, 2 KV groups
FAST = dict(steps=12, samples=4, batch_size=2, seq_len=32, init_windows=4, init_seq_len=32, sparsity=0.3)
# the official per-unit policy (no bias compensation, no incumbent)
UNITS = dict(policy="units", bias_compensation=False, incumbent_every=0)
UNITS_CLI = ("--policy", "units", "--no-bias-compensation", "--incumbent-every", "0")


def _config(tiny_llama_dir, **kw):
    return PruneConfig(model=str(tiny_llama_dir), **{**FAST, **UNITS, **kw})


def _hook_fn(model):
    return lambda ids, masks: hook_losses(model, ids, masks)


# --- end to end -----------------------------------------------------------------------------

def test_prune_cli_writes_every_output(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from bpp.cli import app

    out = tmp_path / "run"
    args = ["prune", "--model", str(tiny_llama_dir), "--out", str(out), "--steps", "8", "--samples", "4",
            "--batch-size", "2", "--seq-len", "32", "--init-windows", "4", "--init-seq-len", "32",
            "--sparsity", "0.3", "--eval-windows", "4", "--quiet", *UNITS_CLI]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    for name in ("mask.safetensors", "theta.safetensors", "metrics.jsonl", "report.json", "kept_per_layer.png",
                 "loss_curve.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["steps"] == 8 and report["steps_done"] == 8
    assert set(report["perplexity"]) >= {"dense", "init_mask", "final_mask"}
    assert all(report["perplexity"][k] > 1 for k in ("dense", "init_mask", "final_mask"))
    mask = Masks.load(out / "mask.safetensors")
    space = MaskSpace.from_model(tiny_model("llama"))
    # per-type count budgets: round(0.7·140) channels and round(0.7·4) groups
    assert int(mask.channels.sum()) == 98 and int(mask.groups.sum()) == 3
    assert report["params"]["final_mask"]["params"] == int(space.params(mask)[0])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(8))
    theta = Masks.load(out / "theta.safetensors")
    assert theta.channels.dtype == torch.float64 and float(theta.channels.min()) >= 0
    assert "pruned to" in result.output
    from transformers import AutoModelForCausalLM

    compacted = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True)
    # the mask's parameters, plus the intercepts of the refit output projections
    intercepts = sum(p.numel() for n, p in compacted.named_parameters() if n.endswith(("o_proj.bias", "down_proj.bias")))
    assert report["compensation"] == "reconstruct" and intercepts > 0
    assert sum(p.numel() for p in compacted.parameters()) - intercepts == report["params"]["final_mask"]["params"]
    # the same folder again: refused without --force
    again = CliRunner().invoke(app, args)
    assert isinstance(again.exception, BppError) and "--force" in str(again.exception)


def test_params_budget_run_stays_within_budget(tiny_llama_dir, tmp_path, tiny_llama_loaded):
    model, tok = tiny_llama_loaded
    report = prune(_config(tiny_llama_dir, budget="params", steps=6), tmp_path / "p", model=model, tokenizer=tok,
                   losses_fn=_hook_fn(model), evaluate=False, progress=False, compact=False)
    (target,) = report["params"]["budget_targets"].values()
    mask = Masks.load(tmp_path / "p" / "mask.safetensors")
    space = MaskSpace.from_model(model)
    kept = int(mask.channels.sum()) * space.channel_params + int(mask.groups.sum()) * space.group_params
    assert kept <= target


def test_leave_one_out_and_layer_granularity_run(tiny_llama_dir, tmp_path, tiny_llama_loaded):
    model, tok = tiny_llama_loaded
    cfg = _config(tiny_llama_dir, baseline="leave-one-out", granularity="layer", sparsity=0.5, init="uniform", steps=4)
    prune(cfg, tmp_path / "l", model=model, tokenizer=tok, losses_fn=_hook_fn(model), evaluate=False,
          progress=False, compact=False)
    mask = Masks.load(tmp_path / "l" / "mask.safetensors")
    assert int(mask.layers.sum()) == 1 and bool(mask.channels.all())


# --- bad inputs -------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    (dict(sparsity=1.0), "strictly between 0 and 1"),
    (dict(sparsity=0.0), "strictly between 0 and 1"),
    (dict(samples=1), "at least 2"),
    (dict(batch_size=100000), "too little calibration text"),
    (dict(evaluations=1000, steps=4), "not both"),
    (dict(granularity="layer", init="uniform", sparsity=0.2), "cannot be met by the granularity layer"),
    (dict(baseline="median"), "unknown baseline"),
])
def test_bad_inputs(tiny_llama_dir, tmp_path, tiny_llama_loaded, changes, message):
    model, tok = tiny_llama_loaded
    with pytest.raises(BppError, match=message):
        prune(_config(tiny_llama_dir, **changes), tmp_path / "bad", model=model, tokenizer=tok, evaluate=False,
              progress=False, compact=False)


def test_existing_dir_needs_force_and_force_replaces_only_bpps_files(tiny_llama_dir, tmp_path, tiny_llama_loaded):
    model, tok = tiny_llama_loaded
    out = tmp_path / "exists"
    kw = dict(model=model, tokenizer=tok, losses_fn=_hook_fn(model), evaluate=False, progress=False, compact=False)
    prune(_config(tiny_llama_dir, steps=2), out, **kw)
    (out / "notes.txt").write_text("mine")  # the user's own file in a bpp run folder
    first = (out / "mask.safetensors").stat().st_mtime_ns
    with pytest.raises(BppError, match="already exists"):
        prune(_config(tiny_llama_dir, steps=2), out, **kw)
    prune(_config(tiny_llama_dir, steps=2), out, force=True, **kw)
    assert (out / "notes.txt").read_text() == "mine"  # --force only replaces bpp's own files
    assert (out / "mask.safetensors").stat().st_mtime_ns != first


def test_resume_with_a_different_config_names_the_difference(tiny_llama_dir, tmp_path, tiny_llama_loaded):
    model, tok = tiny_llama_loaded
    out = tmp_path / "r"
    kw = dict(model=model, tokenizer=tok, losses_fn=_hook_fn(model), evaluate=False, progress=False, compact=False)
    prune(_config(tiny_llama_dir, steps=3), out, **kw)
    (out / "report.json").unlink()  # pretend it was interrupted
    with pytest.raises(BppError, match=r"--sparsity: 0\.4 given, the run has 0\.3"):
        prune(_config(tiny_llama_dir, steps=3, sparsity=0.4), out, resume=True, **kw)
    with pytest.raises(BppError, match="no checkpoint.pt"):
        prune(_config(tiny_llama_dir), tmp_path / "empty", resume=True, **kw)


# --- the loop's details ---------------------------------------------------------------------------

def test_nan_losses_are_dropped_and_all_nan_steps_skipped(tiny_llama_loaded):
    model, _ = tiny_llama_loaded
    space = MaskSpace.from_model(model)
    cfg = PruneConfig(steps=2, samples=4, batch_size=1, seq_len=8, **UNITS).validate()
    policy = UnitsPolicy(Budget(space, cfg.granularity, 0.3), cfg.samples)
    calls = []

    def losses(ids, masks):
        calls.append(1)
        if len(calls) == 1:
            return torch.tensor([1.0, float("nan"), 2.0, float("inf")])
        return torch.full((4,), float("nan"))

    loop = SearchLoop(policy, losses, torch.zeros(2, 8, dtype=torch.long), cfg, progress=False)
    before = policy.theta.clone()
    first = loop.run_step()
    assert first["valid"] == 2 and not first["skipped"] and first["mean_loss"] == 1.5
    assert not torch.equal(policy.theta, before) and policy.moving_baseline == 1.5
    after_first = policy.theta.clone()
    second = loop.run_step()
    assert second["skipped"] and torch.equal(policy.theta, after_first) and loop.skipped_steps == 1
    assert loop.dropped_masks == 2 + 4


def test_cosine_schedule():
    cfg = PruneConfig(steps=10, lr=6e-3)
    assert learning_rate(cfg, 0) == 6e-3
    assert abs(learning_rate(cfg, 5) - 3e-3) < 1e-15
    assert learning_rate(cfg, 9) < learning_rate(cfg, 8) < learning_rate(cfg, 1)


def test_sigmap_and_counts():
    p = sigmap(torch.tensor([[1.0, 2.0, 3.0, 10.0]]), 0.6)
    assert abs(float(p.mean()) - 0.6) < 1e-12 and p.argmax() == 3 and bool((p[0, :-1].diff() > 0).all())
    counts = per_layer_counts(72, 30)
    assert sum(counts) == 72 and set(counts) == {2, 3}
    # the 12 layers with one more unit are spread over the depth: one in every 2.5 layers
    extra = [i for i, c in enumerate(counts) if c == 3]
    assert extra == [1, 3, 6, 8, 11, 13, 16, 18, 21, 23, 26, 28]
    assert per_layer_counts(90, 30) == [3] * 30 and per_layer_counts(5, 3) == [2, 1, 2]


def test_layer_by_layer_replay_matches_the_model(tiny_llama_loaded):
    # wanda-sp feeds layers one at a time from captured layer-0 inputs: with no mask this must
    # reproduce the model's own hidden states
    model, _ = tiny_llama_loaded
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = layer_inputs(model, ids)
    with torch.no_grad():
        for layer in model.model.layers:
            hidden = run_layer(layer, hidden, kwargs)
        reference = model(ids, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(model.model.norm(hidden), reference, atol=1e-5)


def test_wanda_sp_init_ranks_units_and_matches_budget(tiny_llama_loaded):
    model, _ = tiny_llama_loaded
    space = MaskSpace.from_model(model)
    budget = Budget(space, "group,channel", 0.3)
    calib = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(1))
    theta, init_mask, metrics = initialise(budget, "wanda-sp", model, calib)
    assert [abs(s - p.target) < 1e-6 for s, p in zip(budget.sums(theta), budget.parts)] == [True, True]
    assert int(init_mask.channels.sum()) == 98 and int(init_mask.groups.sum()) == 3
    # within a layer, the init mask keeps the top channels of the metric, and θ follows the metric
    ch = metrics["channel"][0]
    kept = init_mask.channels[0, 0]
    assert float(ch[kept].min()) >= float(ch[~kept].max())
    theta_ch = theta[budget.slices["channel"]].reshape(2, 70)[0]
    # sigmap and the projection are monotone: θ never ranks a unit above one with a higher metric
    by_metric = theta_ch[torch.argsort(ch, stable=True)]
    assert bool((by_metric.diff() >= -1e-12).all())
    assert float(by_metric[-5:].min()) > float(by_metric[:5].max())


# --- checkpoint/resume after kill -9 --------------------------------------------------------------

def test_kill_9_then_resume_equals_an_uninterrupted_run(tiny_llama_dir, tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(prune_cmd(tiny_llama_dir, ref, *UNITS_CLI), check=True, env=env, cwd=REPO, capture_output=True,
                   timeout=300)
    proc = subprocess.Popen(prune_cmd(tiny_llama_dir, cut, *UNITS_CLI), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = kill_9_at_checkpoint(proc, cut / "checkpoint.pt", 50, finished=cut / "mask.safetensors")
    assert proc.returncode == -signal.SIGKILL
    assert 50 <= killed_at < 1500 and not (cut / "mask.safetensors").exists()

    subprocess.run([sys.executable, "-m", "bpp", "prune", "--resume", str(cut), "--quiet", "--no-eval"],
                   check=True, env=env, cwd=REPO, capture_output=True, timeout=300)
    assert torch.equal(Masks.load(cut / "theta.safetensors").channels, Masks.load(ref / "theta.safetensors").channels)
    assert torch.equal(Masks.load(cut / "theta.safetensors").groups, Masks.load(ref / "theta.safetensors").groups)
    mask_cut, mask_ref = Masks.load(cut / "mask.safetensors"), Masks.load(ref / "mask.safetensors")
    assert mask_cut == mask_ref
    steps = [json.loads(x)["step"] for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1500))
    report = json.loads((cut / "report.json").read_text())
    assert report["sessions"] == 2
    # the policy actually moved, so equality above is not trivially the init
    init = Masks.load(cut / "init_mask.safetensors")
    assert not torch.equal(Masks.load(cut / "theta.safetensors").channels, init.channels.double()[0])
