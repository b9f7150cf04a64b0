"""Inputs that are wrong but look right: a model that is not the one a mask or a run was made on,
absurd configs and options, damaged side files, GGUF plans with impossible counts, outputs that
would overwrite inputs. Each is refused before anything is written, with one line (``error:
...``, exit 2) or a :class:`bpp.BppError` from the API."""
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from bpp.errors import BppError
from bpp.space import fingerprint_difference, model_fingerprint
from tests.conftest import FAST_CLI as FAST
from tests.conftest import cli as _cli
from tests.conftest import one_line_error as _one_line_error
from tests.tiny import tiny_model, tiny_tokenizer


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# --- the model a mask or a run was made on ---------------------------------------------------------

def _noisy(model, scale: float = 0.003):
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.mul_(1 + scale * torch.randn_like(p))
    return noisy


def test_the_fingerprint_sees_every_weight_but_not_the_dtype():
    model = tiny_model("llama")
    made_for = model_fingerprint(model)
    for dtype in (torch.bfloat16, torch.float16):
        assert fingerprint_difference(made_for, model_fingerprint(copy.deepcopy(model).to(dtype))) is None
    assert fingerprint_difference(made_for, model_fingerprint(_noisy(model))) is not None
    replaced = copy.deepcopy(model)
    other = tiny_model("llama", seed=3).model.layers[1].self_attn
    replaced.model.layers[1].self_attn.load_state_dict(other.state_dict())  # weights the statistics do not read
    assert "model.layers.1.self_attn" in fingerprint_difference(made_for, model_fingerprint(replaced))
    old = {k: v for k, v in made_for.items() if k != "samples"}  # a mask file from before the samples
    assert fingerprint_difference(old, model_fingerprint(model)) is None


def test_compact_refuses_a_noisy_copy_of_the_model(run_dir, tmp_path):
    noisy = _save(_noisy(tiny_model("llama")), tmp_path / "noisy")
    code, err = _cli("compact", "--mask", run_dir / "mask.safetensors", "--model", noisy, "--out", tmp_path / "x")
    _one_line_error(code, err, "made for another model")
    assert not (tmp_path / "x").exists()


def test_resume_refuses_another_model_behind_the_same_path(tmp_path):
    model = _save(tiny_model("llama"), tmp_path / "m")
    out = tmp_path / "run"
    assert _cli("prune", "--model", model, "--out", out, *FAST)[0] == 0
    (out / "report.json").unlink()  # as if interrupted after its last checkpoint
    shutil.rmtree(model)
    _save(tiny_model("llama", seed=5), model)
    code, err = _cli("prune", "--resume", out, "--quiet")
    _one_line_error(code, err, "made on the model", str(model.resolve()), "another model")
    assert not (out / "report.json").exists()


# --- configs no model has ------------------------------------------------------------------------------

def _config_folder(tiny_llama_dir: Path, folder: Path, **changes) -> Path:
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("key,value", [("num_hidden_layers", 0), ("num_hidden_layers", "2"),
                                       ("num_hidden_layers", 10**9), ("num_key_value_heads", 0),
                                       ("num_key_value_heads", 4), ("hidden_size", -60), ("vocab_size", None),
                                       ("intermediate_size", 2.5)])
def test_a_config_with_absurd_sizes_is_refused_before_it_is_built(tiny_llama_dir, tmp_path, key, value):
    import bpp

    folder = _config_folder(tiny_llama_dir, tmp_path / "absurd", **{key: value})
    with pytest.raises(BppError, match=f"config.json: {key} must be"):
        bpp.load_model(folder)
    code, err = _cli("prune", "--model", folder, "--out", tmp_path / "out", *FAST)
    _one_line_error(code, err, key)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kv", [[-1, 2], None, [2], [2, "2"]])
def test_export_refuses_impossible_per_layer_counts(tiny_llama_dir, tmp_path, kv):
    folder = _config_folder(tiny_llama_dir, tmp_path / "m", kv_heads_per_layer=kv,
                            intermediate_size_per_layer=[70, 70])
    code, err = _cli("export", folder, "--out", tmp_path / "m.gguf")
    _one_line_error(code, err, "kv_heads_per_layer")
    assert not (tmp_path / "m.gguf").exists()


def test_export_refuses_to_overwrite_its_own_input(tiny_llama_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, folder)
    before = (folder / "model.safetensors").read_bytes()
    code, err = _cli("export", folder, "--out", folder / "model.safetensors", "--force")
    _one_line_error(code, err, "which the export reads")
    assert (folder / "model.safetensors").read_bytes() == before


# --- options checked before anything is deleted or computed ---------------------------------------------

def _results(run_dir: Path, tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "earlier"
    shutil.copytree(run_dir, out)
    return out, {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


@pytest.mark.parametrize("option", [["--eval-seq-len", "1"], ["--eval-seq-len", "100000"]])
def test_prune_checks_the_evaluation_before_force_removes_anything(run_dir, tiny_llama_dir, tmp_path, option):
    out, before = _results(run_dir, tmp_path)
    fast = [a for a in FAST if a != "--no-eval"]
    code, err = _cli("prune", "--model", tiny_llama_dir, "--out", out, "--force", *fast, *option)
    _one_line_error(code, err, "--eval-seq-len")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("option,needle", [(["--eval-windows", "0"], "--eval-windows"),
                                           (["--eval-seq-len", "100000"], "fewer than one evaluation window")])
def test_baseline_checks_the_evaluation_first(tiny_llama_dir, tmp_path, option, needle):
    code, err = _cli("baseline", "--method", "magnitude", "--model", tiny_llama_dir, "--out", tmp_path / "b",
                     "--calib-windows", "2", "--calib-seq-len", "16", *option)
    _one_line_error(code, err, needle)
    assert not (tmp_path / "b" / "mask.safetensors").exists()


@pytest.mark.parametrize("size", ["0", "-1"])
def test_eval_batch_size_below_one_is_one_line(tiny_llama_dir, size):
    code, err = _cli("eval", "--model", tiny_llama_dir, "--seq-len", "16", "--batch-size", size)
    _one_line_error(code, err, "batch size")


def test_a_perplexity_beyond_a_float_is_inf(tiny_llama_loaded):
    from bpp.evaluation import perplexity

    model, tokenizer = tiny_llama_loaded
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)  # confidently wrong: a mean NLL far above log(float max)
    assert perplexity(model, tokenizer, torch.arange(3, 67), seq_len=16) == float("inf")


# --- side files beside a mask ----------------------------------------------------------------------------

def _mask_copy(run_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "masks"
    folder.mkdir()
    shutil.copy(run_dir / "mask.safetensors", folder / "mask.safetensors")
    return folder / "mask.safetensors"


@pytest.mark.parametrize("damage", ["nan", "shape", "not-safetensors"])
def test_a_damaged_bias_compensation_file_is_refused(run_dir, tiny_llama_dir, tmp_path, damage):
    from safetensors.torch import save_file

    mask = _mask_copy(run_dir, tmp_path)
    means = {f"attn.{i}": torch.zeros(60, dtype=torch.float64) for i in range(2)}
    means.update({f"mlp.{i}": torch.zeros(70, dtype=torch.float64) for i in range(2)})
    if damage == "nan":
        means["mlp.1"][3] = float("nan")
    elif damage == "shape":
        means["attn.0"] = torch.zeros(59, dtype=torch.float64)
    save_file(means, str(mask.parent / "bias_compensation.safetensors"))
    if damage == "not-safetensors":
        (mask.parent / "bias_compensation.safetensors").write_bytes(b"\x07" * 100)
    code, err = _cli("compact", "--mask", mask, "--model", tiny_llama_dir, "--bias-compensation",
                     "--out", tmp_path / "small")
    _one_line_error(code, err, "bias_compensation.safetensors")
    assert not (tmp_path / "small").exists()


def test_a_nan_theta_file_is_refused(run_dir, tiny_llama_dir, tmp_path):
    from bpp.masks import Masks

    mask = _mask_copy(run_dir, tmp_path)
    theta = Masks.load(mask)
    theta = Masks(torch.full(theta.channels.shape[1:], float("nan")), theta.groups[0].float(), theta.layers[0].float())
    theta.save(mask.parent / "theta.safetensors")
    code, err = _cli("compact", "--mask", mask, "--model", tiny_llama_dir, "--round-to", "8", "--out", tmp_path / "s")
    _one_line_error(code, err, "theta.safetensors", "not finite")
    assert not (tmp_path / "s").exists()


# --- texts, mask metadata, output names -------------------------------------------------------------

def test_a_text_with_binary_content_after_its_first_64_kib_is_refused(tmp_path):
    from bpp.data import load_text

    path = tmp_path / "text.txt"
    path.write_bytes(b"plain words and lines\n" * 4000 + bytes(range(256)) * 400)
    with pytest.raises(BppError, match="does not look like text"):
        load_text(str(path), "calib")


def test_mask_metadata_that_is_not_an_object_is_one_line(run_dir, tiny_llama_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(run_dir / "mask.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "mask.safetensors"), metadata={"bpp_model": "[1, 2]"})
    code, err = _cli("compact", "--mask", tmp_path / "mask.safetensors", "--model", tiny_llama_dir,
                     "--out", tmp_path / "small")
    _one_line_error(code, err, "mask.safetensors", "not a JSON object")


@pytest.mark.parametrize("out", [".", "/"])
def test_outputs_without_a_name_are_one_line(run_dir, tiny_llama_dir, tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    code, err = _cli("recover", "--model", run_dir, "--out", out, "--steps", "1")
    _one_line_error(code, err, "--out")
    code, err = _cli("compact", "--mask", run_dir / "mask.safetensors", "--model", tiny_llama_dir, "--out", out,
                     "--export", "gguf")
    _one_line_error(code, err, "--out")


def test_a_busy_model_folder_is_named_in_the_lock_error(tmp_path, monkeypatch):
    from bpp.runs import model_folder_lock

    monkeypatch.chdir(tmp_path)
    held = model_folder_lock(Path("small"), "compact").acquire()
    try:
        with pytest.raises(BppError, match="^small is in use"):
            model_folder_lock(Path("small"), "compact").acquire()
    finally:
        held.release()


def test_an_unknown_hub_id_offline_is_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "bpp", "eval", "--model", "nobody/no-such-model"], env=env,
                          capture_output=True, text=True, timeout=300)
    _one_line_error(done.returncode, done.stderr, "nobody/no-such-model")


def test_export_of_truncated_weights_is_one_line(tiny_llama_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = _cli("export", folder, "--out", tmp_path / "m.gguf")
    _one_line_error(code, err, "truncated or corrupt")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("field,value", [("sparsity", "0.3"), ("steps", 2.5), ("steps", True), ("samples", "8"),
                                         ("bias_compensation", 1), ("policy", 3), ("lr", [0.1])])
def test_wrong_python_types_in_the_api_are_one_line(field, value):
    from bpp.search import PruneConfig

    with pytest.raises(BppError, match=f"--{field.replace('_', '-')} must be"):
        PruneConfig(**{field: value}).validate()


def test_right_python_types_pass_including_numpy_integers_and_ints_for_floats():
    import numpy as np

    from bpp.search import PruneConfig

    config = PruneConfig(sparsity=np.float32(0.25), steps=np.int64(3), lr=1, seed=np.int32(2)).validate()
    assert config.steps == 3 and config.lr == 1 and config.sparsity == 0.25
    assert json.loads(json.dumps(config.to_dict()))["steps"] == 3  # plain numbers in the run's JSON files
