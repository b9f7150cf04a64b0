"""LoRA recovery of a compacted model (`bpp recover`): training lowers the loss, the merged
model equals the adapted one, only LoRA targets change, the saved folder loads without bpp like
its input, an interrupted run resumes to the same weights, and bad input gives one-line errors."""
import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bpp.compaction import save_compacted
from bpp.data import load_text, tokenize
from bpp.errors import BppError
from bpp.jobs.recover import partial_dir
from bpp.methods.lora_recovery import LoraRecovery, lora_recover
from bpp.methods.recovery_config import TARGET_MODULES, RecoverConfig, lr_factor, present_targets, recovery_windows
from bpp.modelio import load_pruned
from bpp.masks import Masks
from bpp.space import MaskSpace
from tests.conftest import isolated_load, kill_9_at_checkpoint
from tests.tiny import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
FAST = dict(steps=12, batch_size=2, seq_len=32, lr=3e-3)


def _hetero_mask(space):
    """Layer 0 keeps both KV groups and 50 of 70 channels; layer 1 has no attention left and
    35 channels: per-layer sizes (the shipped modeling file) with an emptied block."""
    mask = Masks.full(space, 1)
    mask.channels[0, 0, ::7] = False
    mask.channels[0, 0, 1::7] = False
    mask.groups[0, 1] = False
    mask.channels[0, 1, ::2] = False
    return mask


def _uniform_mask(space):
    """One KV group and 40 channels in every layer: a stock config."""
    mask = Masks.full(space, 1)
    mask.groups[0, :, 0] = False
    mask.channels[0, :, 40:] = False
    return mask


def _emptied_mask(space):
    """Layer 0 keeps its attention and no MLP channel; layer 1 no KV group and 35 channels."""
    mask = _hetero_mask(space)
    mask.channels[0, 0] = False
    return mask


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{'hetero': a tied-embedding Llama compacted to per-layer sizes, 'uniform': a Qwen2 (q/k/v
    biases) compacted to a stock config, 'biased': a Qwen3 (q/k norms) with bias compensation whose
    layer 0 has no MLP and layer 1 no attention}, all with the tiny tokenizer."""
    root = tmp_path_factory.mktemp("compacted")
    tok = tiny_tokenizer()
    llama = tiny_model("llama", tie_word_embeddings=True)
    qwen = tiny_model("qwen2")
    qwen3 = tiny_model("qwen3")
    g = torch.Generator().manual_seed(5)
    o_bias, down_bias = ([0.1 * torch.randn(60, generator=g) for _ in range(2)] for _ in range(2))
    return {"hetero": save_compacted(llama, _hetero_mask(MaskSpace.from_model(llama)), root / "hetero", tokenizer=tok),
            "uniform": save_compacted(qwen, _uniform_mask(MaskSpace.from_model(qwen)), root / "uniform", tokenizer=tok),
            "biased": save_compacted(qwen3, _emptied_mask(MaskSpace.from_model(qwen3)), root / "biased", tokenizer=tok,
                                     o_proj_bias=o_bias, down_proj_bias=down_bias)}


@pytest.fixture(scope="module")
def calib_ids():
    return tokenize(tiny_tokenizer(), load_text("default", "calib"))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_the_folders_cover_both_save_paths(folders):
    assert json.loads((folders["hetero"] / "config.json").read_text())["auto_map"]
    assert (folders["hetero"] / "modeling_bpp.py").is_file()
    assert "auto_map" not in json.loads((folders["uniform"] / "config.json").read_text())
    model, _, _ = load_pruned(folders["hetero"])
    assert present_targets(model) == list(TARGET_MODULES)  # layer 0 still has attention
    assert not hasattr(model.model.layers[1].self_attn, "q_proj")


@pytest.mark.parametrize("kind", ["hetero", "uniform"])
def test_recovery_lowers_the_training_loss_and_changes_only_lora_targets(folders, calib_ids, kind):
    model, tok, _ = load_pruned(folders[kind])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = recovery_windows(tok, calib_ids, RecoverConfig(**FAST))

    def mean_loss(m):
        with torch.no_grad():
            return float(m(input_ids=windows, labels=windows).loss)

    loss0 = mean_loss(model)
    with torch.no_grad():  # callers may hold no_grad: training must still happen
        merged, log = lora_recover(model, tok, calib_ids, progress=False, **FAST)
    assert merged is model and not merged.training
    assert type(merged).__name__ == ("BppPrunedForCausalLM" if kind == "hetero" else "Qwen2ForCausalLM")
    assert mean_loss(merged) < loss0 - 0.05, (loss0, mean_loss(merged))
    assert len(log["loss"]) == FAST["steps"] and log["trainable_params"] > 0
    after = merged.state_dict()
    assert set(after) == set(before)  # no LoRA leftovers: the same plain architecture
    targets = [k for k in before if k.endswith(".weight") and k.split(".")[-2] in TARGET_MODULES]
    assert targets and all(not torch.equal(after[k], before[k]) for k in targets)
    assert all(torch.equal(after[k], before[k]) for k in before if k not in targets)  # norms, embeddings, biases


@pytest.mark.parametrize("kind", ["hetero", "uniform", "biased"])
def test_kernels_and_the_hf_forward_train_the_same_adapters(folders, calib_ids, kind):
    """The same seed through bpp_kernels' ops (adapted weights W + s·B·A packed each step, the LM
    head fused with the loss) and through the peft model's Hugging Face forward: the same loss and
    gradient-norm curves and merged weights within fp32 rounding. The kernel path never runs the
    LM head module, so no (batch·T, vocab) logits exist."""
    model, tok, _ = load_pruned(folders[kind])
    if kind == "biased":
        layers = model.model.layers
        assert type(layers[0].mlp).__name__ == "NoMLP" and layers[0].mlp.bias is not None
        assert type(layers[1].self_attn).__name__ == "NoAttention" and layers[1].self_attn.bias is not None
        assert layers[0].self_attn.o_proj.bias is not None and layers[1].mlp.down_proj.bias is not None
    runs = {}
    for engine in ("hf", "kernels"):
        copy_ = copy.deepcopy(model)
        head_calls = []
        copy_.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
        merged, log = lora_recover(copy_, tok, calib_ids, progress=False, engine=engine, **FAST)
        assert log["engine"] == engine and log["engine_fallback_reason"] is None
        assert len(head_calls) == (FAST["steps"] if engine == "hf" else 0)
        runs[engine] = merged.state_dict(), log
    (hf, hf_log), (kern, kern_log) = runs["hf"], runs["kernels"]
    for curve in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor(kern_log[curve]), torch.tensor(hf_log[curve]), rtol=1e-5, atol=0)
    assert set(kern) == set(hf)
    changed = [k for k in hf if not torch.equal(hf[k], model.state_dict()[k])]
    assert changed and all(k.split(".")[-2] in TARGET_MODULES for k in changed)
    assert all(_rel(kern[k], hf[k]) <= 1e-5 for k in changed)
    assert all(torch.equal(kern[k], hf[k]) for k in hf if k not in changed)


def test_auto_engine_trains_through_the_hf_forward_where_the_kernels_cannot(folders, calib_ids):
    model, tok, _ = load_pruned(folders["uniform"])
    job = LoraRecovery(copy.deepcopy(model), tok, calib_ids, RecoverConfig(**FAST), progress=False)
    assert job.engine == "kernels" and job.engine_reason is None
    job = LoraRecovery(copy.deepcopy(model), tok, calib_ids, RecoverConfig(**FAST, dropout=0.1), progress=False)
    assert job.engine == "hf" and "dropout" in job.engine_reason and job.log()["engine"] == "hf"
    with pytest.raises(BppError, match="cannot run through bpp_kernels: LoRA dropout"):
        LoraRecovery(copy.deepcopy(model), tok, calib_ids, RecoverConfig(**FAST, dropout=0.1, engine="kernels"),
                     progress=False)
    model.config.attention_dropout = 0.1  # a model feature the ops lack, in train mode
    job = LoraRecovery(model, tok, calib_ids, RecoverConfig(**FAST), progress=False)
    assert job.engine == "hf" and "attention dropout" in job.engine_reason


def test_merged_logits_equal_the_adapted_model(folders, calib_ids):
    model, tok, _ = load_pruned(folders["hetero"])
    ids = torch.randint(0, model.config.vocab_size, (2, 23))
    with torch.no_grad():
        base = model(ids).logits.clone()
    job = LoraRecovery(model, tok, calib_ids, RecoverConfig(**FAST), progress=False).train()
    job.peft_model.eval()
    with torch.no_grad():
        adapted = job.peft_model(ids).logits.clone()
        merged = job.merge()(ids).logits
    assert _rel(adapted, base) > 1e-3  # the adapters did something
    assert _rel(merged, adapted) <= 1e-5


@pytest.mark.parametrize("kind", ["hetero", "uniform"])
def test_saved_folder_loads_without_bpp_like_its_input(folders, tmp_path, kind):
    from typer.testing import CliRunner

    from bpp.cli import app

    out = tmp_path / "recovered"
    result = CliRunner().invoke(app, ["recover", "--model", str(folders[kind]), "--out", str(out), "--steps", "6",
                                      "--batch-size", "2", "--seq-len", "32", "--lr", "3e-3", "--eval-windows", "3",
                                      "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "before" in result.output and "after" in result.output
    assert not partial_dir(out).exists() and not list(tmp_path.glob(".recovered*"))
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "report.json",
            "bpp_compaction.json", "tokenizer.json"} <= files
    source_cfg = json.loads((folders[kind] / "config.json").read_text())
    out_cfg = json.loads((out / "config.json").read_text())
    for key in ("model_type", "architectures", "auto_map", "num_hidden_layers", "kv_heads_per_layer",
                "intermediate_size_per_layer", "intermediate_size", "num_key_value_heads", "tie_word_embeddings"):
        assert out_cfg.get(key) == source_cfg.get(key), key
    assert ("modeling_bpp.py" in files) == (kind == "hetero")
    if kind == "hetero":
        assert (out / "modeling_bpp.py").read_text() == (folders[kind] / "modeling_bpp.py").read_text()

    report = json.loads((out / "report.json").read_text())
    assert report["perplexity"]["seq_len"] == 128 and report["perplexity"]["max_windows"] == 3
    assert report["perplexity"]["before"] > 1 and report["perplexity"]["after"] > 1
    assert len(report["loss_curve"]) == 6 and len(report["lr_curve"]) == 6
    assert report["timings_s"]["train"] > 0 and report["sessions"] == 1

    recovered, _, _ = load_pruned(out)
    ids = torch.randint(0, recovered.config.vocab_size, (2, 11))
    with torch.no_grad():
        expected = recovered(ids).logits
    got = isolated_load(out, ids, trust=kind == "hetero")
    assert _rel(torch.tensor(got["logits"]), expected) <= 1e-5
    assert len(got["cache"][0]) == 11 + 5 and got["cache"] == got["nocache"]
    original, _, _ = load_pruned(folders[kind])
    assert not torch.equal(original.model.layers[0].mlp.down_proj.weight, recovered.model.layers[0].mlp.down_proj.weight)

    if kind == "uniform":  # --force replaces the folder whole, leaving nothing aside
        again = CliRunner().invoke(app, ["recover", "--model", str(folders[kind]), "--out", str(out), "--steps", "2",
                                         "--batch-size", "2", "--seq-len", "32", "--no-eval", "--quiet", "--force"])
        assert again.exit_code == 0, again.output + repr(again.exception)
        report = json.loads((out / "report.json").read_text())
        assert len(report["loss_curve"]) == 2 and report["perplexity"] is None
        assert sorted(p.name for p in tmp_path.iterdir()) == ["recovered"]


class _Stop(Exception):
    pass


def test_resume_after_an_interruption_equals_an_uninterrupted_run(folders, calib_ids, tmp_path):
    kw = dict(FAST, dropout=0.1, progress=False, checkpoint_every=3)  # dropout: the run's RNG matters
    model, tok, _ = load_pruned(folders["hetero"])
    reference, ref_log = lora_recover(copy.deepcopy(model), tok, calib_ids, **kw)

    def stop_at_8(record):
        if record["step"] == 7:  # the 8th step is done; the last checkpoint is after step 6
            raise _Stop

    rng_before = torch.get_rng_state()
    with pytest.raises(_Stop):
        lora_recover(copy.deepcopy(model), tok, calib_ids, checkpoint_dir=tmp_path, on_step=stop_at_8, **kw)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the run used its own RNG stream
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 6 and {"adapters", "optimizer", "scheduler", "rng"} <= set(state)

    resumed, log = lora_recover(copy.deepcopy(model), tok, calib_ids, checkpoint_dir=tmp_path, resume=True, **kw)
    assert log["sessions"] == 2 and log["loss"] == ref_log["loss"]
    ref_sd, got_sd = reference.state_dict(), resumed.state_dict()
    assert all(torch.allclose(got_sd[k], ref_sd[k], rtol=0, atol=1e-6) for k in ref_sd)
    assert not torch.equal(ref_sd["model.layers.0.mlp.up_proj.weight"], model.state_dict()["model.layers.0.mlp.up_proj.weight"])

    with pytest.raises(BppError, match="different configuration"):
        lora_recover(copy.deepcopy(model), tok, calib_ids, checkpoint_dir=tmp_path, resume=True, **dict(kw, lr=1e-3))
    other, _, _ = load_pruned(folders["uniform"])
    with pytest.raises(BppError, match="different configuration|different model"):
        lora_recover(other, tok, calib_ids, checkpoint_dir=tmp_path, resume=True, **kw)


def _recover_cmd(model_dir, out, *extra):
    return [sys.executable, "-m", "bpp", "recover", "--model", str(model_dir), "--out", str(out), "--steps", "400",
            "--batch-size", "1", "--seq-len", "16", "--lr", "1e-3", "--checkpoint-every", "5", "--eval-windows", "2",
            "--quiet", *extra]


def test_kill_9_then_resume_equals_an_uninterrupted_run(folders, tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    done = subprocess.run(_recover_cmd(folders["hetero"], ref), check=True, env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert "custom code" not in done.stderr  # bpp's own modeling code: transformers never asks to run the folder's

    proc = subprocess.Popen(_recover_cmd(folders["hetero"], cut), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # the output folder appears only when the run has finished
    killed_at = kill_9_at_checkpoint(proc, partial_dir(cut) / "checkpoint.pt", 20, finished=cut)
    assert proc.returncode == -signal.SIGKILL
    assert 20 <= killed_at < 400 and not cut.exists()

    # options not repeated on --resume come from the interrupted run
    subprocess.run([sys.executable, "-m", "bpp", "recover", "--resume", "--out", str(cut), "--quiet"],
                   check=True, env=env, cwd=REPO, capture_output=True, timeout=300)
    assert not partial_dir(cut).exists()
    got, want = load_file(cut / "model.safetensors"), load_file(ref / "model.safetensors")
    assert set(got) == set(want) and all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want)
    rep_cut, rep_ref = (json.loads((d / "report.json").read_text()) for d in (cut, ref))
    assert rep_cut["sessions"] == 2 and rep_cut["loss_curve"] == rep_ref["loss_curve"]
    assert rep_cut["perplexity"]["before"] == rep_ref["perplexity"]["before"]


# --- errors ------------------------------------------------------------------------------------

def _cli_error(capsys, *args) -> str:
    from bpp.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["recover", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err
    message = err[err.index("error:"):].strip()
    assert len(message.splitlines()) <= 3  # one message (rich may wrap it)
    return " ".join(message.split())


def test_cli_errors(folders, tmp_path, capsys):
    model = str(folders["uniform"])
    small = ["--batch-size", "2", "--seq-len", "32", "--quiet", "--no-eval"]
    (tmp_path / "taken").mkdir()
    assert "exists; pass --force" in _cli_error(capsys, "--model", model, "--out", str(tmp_path / "taken"), *small)
    assert "does not exist" in _cli_error(capsys, "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert "no config.json" in _cli_error(capsys, "--model", str(tmp_path / "taken"), "--out", str(tmp_path / "o"))
    assert "steps must be at least 1" in _cli_error(capsys, "--model", model, "--out", str(tmp_path / "o"),
                                                    "--steps", "0")
    short = tmp_path / "short.txt"
    short.write_text("A few words of text, far too few for training. " * 20)
    assert "too little text" in _cli_error(capsys, "--model", model, "--out", str(tmp_path / "o"), "--data", str(short),
                                           "--steps", "50", *small)
    assert "nothing to resume" in _cli_error(capsys, "--out", str(tmp_path / "o"), "--resume")
    assert "--model" in _cli_error(capsys, "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists() and not partial_dir(tmp_path / "o").exists()

    partial_dir(tmp_path / "o2").mkdir()
    assert "--resume" in _cli_error(capsys, "--model", model, "--out", str(tmp_path / "o2"), *small)


def test_bad_arguments_of_the_function(folders, calib_ids):
    model, tok, _ = load_pruned(folders["uniform"])
    for kw, message in [({"steps": 0}, "steps must be"), ({"rank": 0}, "rank"), ({"lr": -1.0}, "learning rate"),
                        ({"schedule": "step"}, "unknown schedule"), ({"target_modules": ("nope",)}, "none of the LoRA"),
                        ({"engine": "triton"}, "engine must be one of"),
                        ({"resume": True}, "checkpoint_dir")]:
        with pytest.raises(BppError, match=message):
            lora_recover(model, tok, calib_ids, **{**FAST, **kw}, progress=False)
    assert all(not n.startswith("base_model") for n, _ in model.named_modules())  # left unwrapped


def test_schedule_warms_up_then_decays():
    f = [lr_factor(s, steps=20, warmup_steps=4, schedule="cosine") for s in range(20)]
    assert f[0] == pytest.approx(0.2) and f[3] == pytest.approx(0.8) and f[4] == 1.0
    assert all(a > b for a, b in zip(f[4:], f[5:])) and f[-1] > 0
    lin = [lr_factor(s, steps=10, warmup_steps=0, schedule="linear") for s in range(10)]
    assert lin[0] == 1.0 and lin[-1] == pytest.approx(0.1)
