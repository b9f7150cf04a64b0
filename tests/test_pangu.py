"""Pangu Light re-initialisation at compaction: CLAP (dropped layers' KV groups move into the next
kept layer), SLNP (block output scales), absorbed RMSNorm scales; the CLI flags."""
import json

import pytest
import torch

import bpp

from bpp.compaction import compact_model
from bpp.errors import BppError
from bpp.methods.pangu import PanguOptions, calibrate, clap_plan, transform
from bpp.masks import Masks
from bpp.space import MaskSpace
from tests.tiny import tiny_model


def _ids(n=4, T=16):
    return torch.randint(3, 300, (n, T))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family,tied", [("llama", False), ("mistral", True), ("qwen2", False), ("qwen3", True)])
def test_absorbing_norms_keeps_the_logits(family, tied):
    model = tiny_model(family, seed=int(torch.randint(0, 1000, ())), tie_word_embeddings=tied)
    space = MaskSpace.from_model(model)
    mask = Masks.full(space, 1)
    mask.channels[0, 0, ::3] = False
    mask.groups[0, 1, 0] = False
    plain = compact_model(model, mask)
    options = PanguOptions(absorb_norms=True)
    small = compact_model(model, mask, transform=transform(options))
    ids = _ids(2, 13)
    assert _rel(_logits(small, ids), _logits(plain, ids)) <= 1e-5
    for layer in small.model.layers:
        assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
        assert torch.equal(layer.post_attention_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert ("norm" in options.report["absorbed_norms"]) == (not tied)
    if tied:  # the LM head is the embedding: the final norm stays
        assert not torch.equal(small.model.norm.weight, torch.ones_like(small.model.norm.weight))
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in plain.parameters())


def test_absorb_norms_on_a_per_layer_size_model():
    model = tiny_model("qwen2", num_hidden_layers=3)
    space = MaskSpace.from_model(model)
    mask = Masks.full(space, 1)
    mask.groups[0, 1] = False  # a layer without attention
    mask.channels[0, 2, :50] = False
    plain = compact_model(model, mask)
    small = compact_model(model, mask, transform=transform(PanguOptions(absorb_norms=True)))
    ids = _ids(2, 9)
    assert _rel(_logits(small, ids), _logits(plain, ids)) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_clap_moving_every_group_equals_swapping_in_the_dropped_attention(family):
    """Layer 0 dropped, layer 1 kept whole, layer 0's groups scored higher: layer 1's attention
    becomes layer 0's (q/k/v rescaled for layer 1's input norm). The reference builds that model
    directly: layer 0's attention and input norm copied into layer 1, then plain compaction."""
    model = tiny_model(family, seed=int(torch.randint(0, 1000, ())))
    space = MaskSpace.from_model(model)
    mask = Masks.full(space, 1)
    mask.layers[0, 0] = False
    mask.channels[0, 1, :7] = False
    options = calibrate(model, mask, _ids(), PanguOptions(clap=True))
    options.group_scores = torch.tensor([[5.0, 4.0], [1.0, 2.0]], dtype=torch.float64)
    small = compact_model(model, mask, transform=transform(options))
    assert [(m["from_layer"], m["group"]) for m in options.report["clap_moved_groups"]] == [(0, 0), (0, 1)]

    import copy
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        ref_model.model.layers[1].self_attn.load_state_dict(model.model.layers[0].self_attn.state_dict())
        ref_model.model.layers[1].input_layernorm.weight.copy_(model.model.layers[0].input_layernorm.weight)
    reference = compact_model(ref_model, mask)
    ids = _ids(2, 11)
    assert _rel(_logits(small, ids), _logits(reference, ids)) <= 1e-5
    assert _rel(_logits(small, ids), _logits(compact_model(model, mask), ids)) > 1e-3  # and it did change


def test_clap_keeps_the_top_k_of_both_layers_and_the_parameter_count():
    model = tiny_model("mistral", num_hidden_layers=3)
    space = MaskSpace.from_model(model)
    mask = Masks.full(space, 1)
    mask.layers[0, 1] = False
    mask.groups[0, 2, 1] = False  # layer 2 keeps one group: one slot
    options = calibrate(model, mask, _ids(), PanguOptions(clap=True))
    scores = torch.rand(3, 2, dtype=torch.float64)
    scores[1, 1], scores[2, 0] = 9.0, 1.0
    options.group_scores = scores
    small = compact_model(model, mask, transform=transform(options))
    assert options.report["clap_moved_groups"] == [{"from_layer": 1, "group": 1, "to_layer": 2}]
    sa, da = model.model.layers[1].self_attn, small.model.layers[1].self_attn
    hd, r, d = space.head_dim, space.heads_per_group, space.hidden_size
    torch.testing.assert_close(da.o_proj.weight, sa.o_proj.weight.view(d, 2, r * hd)[:, 1])
    ratio = model.model.layers[1].input_layernorm.weight / model.model.layers[2].input_layernorm.weight
    torch.testing.assert_close(da.k_proj.weight, sa.k_proj.weight.view(2, hd, d)[1] * ratio)
    assert sum(p.numel() for p in small.parameters()) == int(space.params(mask)[0])
    # the target's own group scored higher: nothing moves, the model is the plain compaction
    options.group_scores = torch.ones(3, 2, dtype=torch.float64)
    options.group_scores[2, 0] = 5.0
    kept = compact_model(model, mask, transform=transform(options))
    assert options.report["clap_moved_groups"] == []
    ids = _ids(1, 9)
    assert torch.equal(_logits(kept, ids), _logits(compact_model(model, mask), ids))


def test_clap_plan_targets_the_next_kept_layer_and_the_last_goes_back():
    space_layers, G = 5, 2
    layers = torch.tensor([[False, True, False, False, True]])
    eff = Masks(torch.ones(1, space_layers, 4, dtype=torch.bool), torch.ones(1, space_layers, G, dtype=torch.bool),
                layers)
    scores = torch.zeros(space_layers, G, dtype=torch.float64)
    scores[0, 1] = scores[2, 0] = scores[3, 1] = 10.0
    plan = clap_plan(eff, [1, 4], scores)
    assert plan == {1: [(1, 0), (0, 1)],  # layer 0 → layer 1: its best group beats one of layer 1's (ties: own)
                    4: [(2, 0), (3, 1)]}  # layers 2 and 3 both → layer 4, both win
    last = Masks(torch.ones(1, 3, 4, dtype=torch.bool), torch.ones(1, 3, G, dtype=torch.bool),
                 torch.tensor([[True, True, False]]))
    s = torch.zeros(3, G, dtype=torch.float64)
    s[2] = 1.0
    assert set(clap_plan(last, [0, 1], s)[1]) == {(2, 0), (2, 1)}  # the last layer goes to the previous
    assert clap_plan(last, [0, 1, 2], s) == {}


def test_slnp_scales_each_block_to_its_dense_output_norm():
    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    mask = Masks.full(space, 1)
    mask.channels[0, 0, :30] = False
    mask.groups[0, 1, 1] = False
    ids = _ids()
    options = calibrate(model, mask, ids, PanguOptions(slnp=True))
    captured = {}
    hooks = [model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
                 lambda m, a: captured.setdefault("down", a[0].detach().clone())),
             model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(
                 lambda m, a: captured.setdefault("o", a[0].detach().clone()))]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    x = captured["down"].double().reshape(-1, space.n_channels)
    w = model.model.layers[0].mlp.down_proj.weight.detach().double()
    want = ((x @ w.T).pow(2).sum() / ((x * mask.channels[0, 0].double()) @ w.T).pow(2).sum()).sqrt()
    assert abs(options.mlp_scale[0] - float(want)) < 1e-9 and options.mlp_scale[0] > 1
    x = captured["o"].double().reshape(-1, captured["o"].shape[-1])
    keep = mask.groups[0, 1].repeat_interleave(space.heads_per_group * space.head_dim).double()
    wo = model.model.layers[1].self_attn.o_proj.weight.detach().double()
    want = ((x @ wo.T).pow(2).sum() / ((x * keep) @ wo.T).pow(2).sum()).sqrt()
    assert abs(options.attn_scale[1] - float(want)) < 1e-9
    assert options.attn_scale[0] == 1.0 and options.mlp_scale[1] == 1.0  # nothing pruned there
    small = compact_model(model, mask, transform=transform(options))
    plain = compact_model(model, mask)
    torch.testing.assert_close(small.model.layers[0].mlp.down_proj.weight,
                               plain.model.layers[0].mlp.down_proj.weight * options.mlp_scale[0])


def test_errors():
    model = tiny_model("qwen3")
    space = MaskSpace.from_model(model)
    mask = Masks.full(space, 1)
    mask.layers[0, 0] = False
    with pytest.raises(BppError, match="q/k norms"):
        calibrate(model, mask, _ids(), PanguOptions(clap=True))
    llama = tiny_model("llama")
    mask = Masks.full(MaskSpace.from_model(llama), 1)
    mask.layers[0, 0] = False
    with pytest.raises(BppError, match="bias-compensation"):
        bpp.compact(llama, mask, bias_compensation=True, clap=True)
    with pytest.raises(BppError, match="calibrate"):
        compact_model(llama, mask, transform=transform(PanguOptions(slnp=True)))


def test_cli_compact_with_pangu_flags(tmp_path, tokenizer):
    from typer.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from bpp.cli import app

    model = tiny_model("llama", num_hidden_layers=3)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    space = MaskSpace.from_model(model)
    mask = Masks.full(space, 1)
    mask.layers[0, 1] = False
    mask.channels[0, :, :10] = False
    mask.save(tmp_path / "mask.safetensors")
    args = ["compact", "--model", str(tmp_path / "m"), "--mask", str(tmp_path / "mask.safetensors"),
            "--out", str(tmp_path / "small"), "--clap", "--slnp", "--absorb-norms", "--calib-windows", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "CLAP:" in result.output and "SLNP:" in result.output and "absorbed" in result.output
    record = json.loads((tmp_path / "small" / "bpp_compaction.json").read_text())
    assert record["pangu_light"]["clap"] and len(record["pangu_light"]["slnp_scales"]["mlp"]) == 2
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    assert sum(p.numel() for p in small.parameters()) == int(space.params(mask)[0])
    assert torch.isfinite(_logits(small, _ids(1, 8))).all()
    bad = CliRunner().invoke(app, args + ["--force", "--bias-compensation"])
    assert bad.exit_code != 0 and isinstance(bad.exception, BppError)
