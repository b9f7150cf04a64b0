"""Compaction: dense pruned weights whose logits equal the masked model's, saved so that plain
transformers loads them."""
import json

import pytest
import torch

from bpp import Masks, MaskSpace
from bpp.compaction import compact_model, round_mask, save_compacted
from bpp.errors import BppError
from bpp.models.hooks import hook_masks
from tests.conftest import isolated_load
from tests.tiny import seed_for_test, tiny_model


def _mask(space, kind: str, seed: int | None = None) -> Masks:
    """A mask of the given kind on a 2-layer model; the random parts are seeded by the test's id."""
    g = torch.Generator().manual_seed(seed_for_test(kind) if seed is None else seed)
    full = Masks.full(space, 1)
    if kind == "full":
        return full
    if kind == "uniform":  # the same counts in every layer: the stock-config path
        for i in range(space.n_layers):
            full.channels[0, i, torch.randperm(space.n_channels, generator=g)[:40]] = False
            full.groups[0, i, torch.randperm(space.n_groups, generator=g)[:1]] = False
        return full
    mask = Masks.sample(Masks.probabilities(space, 0.6), 1, g)
    mask.layers[:] = True
    mask.groups[0, 0] = True  # layer 0 keeps every group, layer 1 all but the first: sizes differ
    mask.groups[0, 1] = True
    mask.groups[0, 1, 0] = False
    mask.channels[0, :, :5] = True
    if kind == "no-attention":
        mask.groups[0, 1] = False
    elif kind == "no-mlp":
        mask.channels[0, 1] = False
    elif kind == "dropped-layer":
        mask.layers[0, 0] = False
    elif kind == "empty-layer":  # kept, but nothing in it: the identity, dropped at compaction
        mask.groups[0, 0] = False
        mask.channels[0, 0] = False
    return mask


def _masked_logits(model, mask, ids):
    with hook_masks(model, mask), torch.no_grad():
        return model(ids).logits


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["random", "no-attention", "no-mlp", "dropped-layer", "empty-layer", "full", "uniform"])
def test_compacted_logits_and_params_equal_the_masked_model(tiny, kind):
    space = MaskSpace.from_model(tiny)
    mask = _mask(space, kind)
    small = compact_model(tiny, mask)
    ids = torch.randint(0, tiny.config.vocab_size, (2, 19))
    with torch.no_grad():
        got = small(ids).logits
    assert _rel(got, _masked_logits(tiny, mask, ids)) <= 1e-4
    assert sum(p.numel() for p in small.parameters()) == int(space.params(mask)[0])
    eff = mask.effective()
    kept = [i for i in range(space.n_layers) if eff.layers[0, i] and (eff.groups[0, i].any() or eff.channels[0, i].any())]
    sizes = {(int(eff.groups[0, i].sum()), int(eff.channels[0, i].sum())) for i in kept}
    stock = len(sizes) == 1 and min(min(sizes)) > 0  # one shape, no empty block: a stock config
    assert stock == (kind in ("full", "uniform", "dropped-layer", "empty-layer"))
    assert (getattr(small.config, "auto_map", None) is None) == stock
    assert small.config.num_hidden_layers == (1 if kind in ("dropped-layer", "empty-layer") else 2)


def test_compaction_leaves_the_model_untouched():
    model = tiny_model("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compact_model(model, _mask(MaskSpace.from_model(model), "random"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _masked_greedy(model, mask, prompt, n):
    """Greedy continuation of the hook-masked full model, recomputed from scratch at each step."""
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, _masked_logits(model, mask, seq)[:, -1:].argmax(-1)], dim=1)
    return seq.tolist()


@pytest.mark.parametrize("kind", ["no-attention", "uniform"])
def test_saved_folder_loads_without_bpp_and_generates_with_cache(tmp_path, tokenizer, kind):
    model = tiny_model("qwen3" if kind == "uniform" else "llama")
    space = MaskSpace.from_model(model)
    mask = _mask(space, kind)
    out = save_compacted(model, mask, tmp_path / "small", tokenizer=tokenizer)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "generation_config.json").is_file()
    assert (out / "modeling_bpp.py").is_file() == (kind != "uniform")
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    result = isolated_load(out, ids, trust=kind != "uniform")
    assert _rel(torch.tensor(result["logits"]), _masked_logits(model, mask, ids)) <= 1e-4
    assert result["cache"] == result["nocache"]  # the KV-cache path decodes the same tokens
    assert result["cache"] == _masked_greedy(model, mask, ids[:1], 5)
    config = json.loads((out / "config.json").read_text())
    if kind != "uniform":
        assert config["kv_heads_per_layer"][1] == 0 and result["cls"] == "BppPrunedForCausalLM"


def test_bad_inputs(tmp_path):
    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    other = Masks.full(MaskSpace.from_model(tiny_model("llama", intermediate_size=50)), 1)
    with pytest.raises(BppError, match="masks.channels has shape"):
        compact_model(model, other)
    nothing = Masks.full(space, 1)
    nothing.layers[:] = False
    with pytest.raises(BppError, match="keeps nothing"):
        compact_model(model, nothing)
    with pytest.raises(BppError, match="one mask"):
        compact_model(model, Masks.full(space, 2))
    (tmp_path / "exists").mkdir()
    with pytest.raises(BppError, match="exists; pass --force"):
        save_compacted(model, Masks.full(space, 1), tmp_path / "exists")
    save_compacted(model, Masks.full(space, 1), tmp_path / "exists", force=True)  # empty: nothing to lose
    save_compacted(model, Masks.full(space, 1), tmp_path / "exists", force=True)  # bpp's own: replaced
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(BppError, match="not a model folder bpp wrote"):
        save_compacted(model, Masks.full(space, 1), tmp_path / "foreign", force=True)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "exists" / "config.json").is_file()


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama")
    mask = _mask(MaskSpace.from_model(model), "random")

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_compacted(model, mask, tmp_path / "out", tokenizer=Broken())
    assert list(tmp_path.iterdir()) == []


def test_round_to_adds_the_highest_scored_channels():
    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    mask = _mask(space, "random")
    mask.channels[0, 0] = False
    mask.channels[0, 0, torch.randperm(space.n_channels)[:13]] = True  # 13 → 16
    mask.channels[0, 1] = False  # an emptied MLP stays empty
    scores = torch.rand(space.n_layers, space.n_channels)
    rounded = round_mask(mask, 8, scores)
    assert not rounded.channels[0, 1].any()
    assert torch.equal(rounded.groups, mask.groups) and torch.equal(rounded.layers, mask.layers)
    before, after = int(mask.channels[0, 0].sum()), int(rounded.channels[0, 0].sum())
    assert (before, after) == (13, 16)
    assert (mask.channels[0, 0] <= rounded.channels[0, 0]).all()
    added = rounded.channels[0, 0] & ~mask.channels[0, 0]
    left_out = ~rounded.channels[0, 0]
    assert scores[0][added].min() >= scores[0][left_out].max()
    with pytest.raises(BppError, match="round-to"):
        round_mask(mask, 7)
    with pytest.raises(BppError, match="channel scores have shape"):
        round_mask(mask, 8, scores[:1])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bias_compensation_keeps_each_blocks_mean_output(family):
    """FLAP compensation, analytically: fed the full model's inputs, every compacted o_proj and
    down_proj (or the constant of an emptied block) has the same mean output over the
    calibration tokens as the unpruned one, while plain pruning changes that mean."""
    from bpp.bias_compensation import InputStats
    from bpp.methods.flap import compensation_biases

    model = tiny_model(family, seed=int(torch.randint(0, 1000, ())))
    space = MaskSpace.from_model(model)
    ids = torch.randint(0, model.config.vocab_size, (4, 15))
    stats = InputStats(model).collect(ids)
    mask = _mask(space, "no-attention")
    attn_bias, mlp_bias = compensation_biases(model, mask, stats)
    small = compact_model(model, mask, o_proj_bias=attn_bias, down_proj_bias=mlp_bias)
    assert sum(p.numel() for p in small.parameters()) == int(space.params(mask)[0]) + 2 * 2 * space.hidden_size

    inputs = {}
    hooks = [module.register_forward_pre_hook(lambda mod, args, key=key: inputs.__setitem__(key, args[0].flatten(0, 1)))
             for i, layer in enumerate(model.model.layers)
             for key, module in (((i, "attn"), layer.self_attn.o_proj), ((i, "mlp"), layer.mlp.down_proj))]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    per_head = space.heads_per_group * space.head_dim
    with torch.no_grad():
        for i in range(space.n_layers):
            full_layer, small_layer = model.model.layers[i], small.model.layers[i]
            kept_cols = mask.groups[0, i].repeat_interleave(per_head)
            z = inputs[(i, "attn")]
            want = full_layer.self_attn.o_proj(z).mean(0)
            if kept_cols.any():
                got = small_layer.self_attn.o_proj(z[:, kept_cols]).mean(0)
                uncompensated = (z[:, kept_cols] @ full_layer.self_attn.o_proj.weight[:, kept_cols].T).mean(0)
            else:
                got, uncompensated = small_layer.self_attn.bias, torch.zeros_like(want)
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
            if not kept_cols.all():
                assert not torch.allclose(uncompensated, want, rtol=1e-4, atol=1e-5)
            x, kept = inputs[(i, "mlp")], mask.channels[0, i]
            want = full_layer.mlp.down_proj(x).mean(0)
            got = small_layer.mlp.down_proj(x[:, kept]).mean(0)
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
            assert kept.any() and not kept.all()
            assert not torch.allclose((x[:, kept] @ full_layer.mlp.down_proj.weight[:, kept].T).mean(0), want,
                                      rtol=1e-4, atol=1e-5)


def test_unknown_architecture_is_a_clear_error():
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(BppError, match="gpt2"):
        compact_model(gpt2, Masks(torch.ones(1, 1, 128, dtype=torch.bool), torch.ones(1, 1, 2, dtype=torch.bool),
                            torch.ones(1, 1, dtype=torch.bool)))


def test_save_load_roundtrip_is_exact(tiny, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    space = MaskSpace.from_model(tiny)
    mask = _mask(space, "random")
    small = compact_model(tiny, mask)
    out = save_compacted(tiny, mask, tmp_path / "small", tokenizer=tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    want, got = small.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    record = json.loads((out / "bpp_compaction.json").read_text())
    assert record["params"] == int(space.params(mask)[0]) == sum(p.numel() for p in loaded.parameters())
    assert [layer["channels"] for layer in record["layers"]] == mask.channels[0].sum(-1).tolist()


def test_cli_compact(tmp_path, tokenizer):
    from typer.testing import CliRunner

    from bpp.cli import app

    model = tiny_model("mistral")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    mask = _mask(MaskSpace.from_model(model), "no-mlp")
    mask.save(tmp_path / "mask.safetensors")
    args = ["compact", "--model", str(tmp_path / "m"), "--mask", str(tmp_path / "mask.safetensors"),
            "--out", str(tmp_path / "small")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "parameters" in result.output
    from transformers import AutoModelForCausalLM

    small = AutoModelForCausalLM.from_pretrained(tmp_path / "small", trust_remote_code=True)
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    with torch.no_grad():
        assert _rel(small(ids).logits, _masked_logits(model, mask, ids)) <= 1e-4
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and isinstance(again.exception, BppError)

    rounded = CliRunner().invoke(app, args + ["--force", "--round-to", "8", "--bias-compensation", "--calib-windows", "2"])
    assert rounded.exit_code == 0, rounded.output
    assert "multiples of 8 (extra channels by weight magnitude)" in rounded.output
    record = json.loads((tmp_path / "small" / "bpp_compaction.json").read_text())
    assert record["bias_compensation"] and record["round_to"]["channels_after"][1] == 0
    assert record["round_to"]["channels_after"][0] in (-(-record["round_to"]["channels_before"][0] // 8) * 8, 70)
    assert [layer["channels"] for layer in record["layers"]] == record["round_to"]["channels_after"]


@pytest.mark.parametrize("kind", ["random", "uniform"])
def test_tied_embeddings_stay_tied(tmp_path, tokenizer, kind):
    """SmolLM2 (the default model) ties its LM head to the embedding: a compacted model must carry
    the tie, in memory and through save/load (an untied per-layer model once kept a zero head)."""
    from transformers import AutoModelForCausalLM

    tied = tiny_model("llama", tie_word_embeddings=True)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    space = MaskSpace.from_model(tied)
    mask = _mask(space, kind)
    small = compact_model(tied, mask)
    assert small.lm_head.weight.data_ptr() == small.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, tied.config.vocab_size, (2, 19))
    want = _masked_logits(tied, mask, ids)
    with torch.no_grad():
        assert _rel(small(ids).logits, want) <= 1e-4
        loaded = AutoModelForCausalLM.from_pretrained(
            save_compacted(tied, mask, tmp_path / "small", tokenizer=tokenizer), trust_remote_code=True)
        assert _rel(loaded(ids).logits, want) <= 1e-4


def test_decoding_from_the_cache_with_an_emptied_first_attention():
    """A layer without attention still records the sequence length in the KV cache, so decoding
    token by token from the cache equals the full forward (layer 0 emptied: the cache's length
    is read from it)."""
    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    mask = Masks.full(space, 1)
    mask.groups[0, 0] = False
    mask.channels[0, 1, :30] = False
    small = compact_model(model, mask)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = small(ids).logits
        out = small(ids[:, :9], use_cache=True)
        step = out.logits[:, -1]
        cache = out.past_key_values
        for t in range(9, 12):
            assert torch.allclose(step, full[:, t - 1], atol=1e-5)
            out = small(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            step, cache = out.logits[:, -1], out.past_key_values
