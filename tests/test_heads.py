"""Query-head slots (``Masks.heads``): slot j of a layer is query head j of every KV group. The hook
ground truth zeroes the pruned heads, the batched engine equals it per sample, parameter counts
equal the compacted model's, compaction writes regular GQA layers (a stock config when uniform,
bpp's modeling file with per-layer head counts otherwise), and mask files keep the slots."""
import json
import os

import pytest
import torch

from bpp import MaskedModel, Masks, MaskSpace
from bpp.compaction import compact_model, save_compacted
from bpp.errors import BppError
from bpp.models.hooks import hook_losses, hook_masks
from tests.conftest import isolated_load
from tests.tiny import tiny_model


def _heads_masks(space: MaskSpace, S: int, seed: int) -> Masks:
    """Random masks with slots; sample 0 keeps every unit, sample 1 prunes every slot of layer 0
    and keeps every slot of layer 1 (its groups and channels kept), sample 2 keeps one slot in
    one group of layer 1 only."""
    g = torch.Generator().manual_seed(seed)
    theta = Masks.probabilities(space, 0.7)
    theta.heads = torch.full((space.n_layers, space.heads_per_group), 0.6)
    masks = Masks.sample(theta, S, g)
    masks.channels[:3], masks.groups[:3], masks.layers[:3], masks.heads[:3] = True, True, True, True
    masks.heads[1, 0] = False
    masks.groups[2, 1, 1:] = False
    masks.heads[2, 1, 1:] = False
    return masks


@pytest.mark.parametrize("family, backend", [("llama", "auto"), ("qwen2", "auto"), ("qwen3", "auto"),
                                             ("llama", "reference"), ("qwen3", "triton")])
def test_batched_losses_equal_the_hooks_with_head_slots(family, backend, monkeypatch):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors reach Triton only under TRITON_INTERPRET=1")
    monkeypatch.setenv("BPP_KERNELS_BACKEND", backend)
    model = tiny_model(family, num_hidden_layers=3)
    space = MaskSpace.from_model(model)
    assert space.n_groups >= 2 and space.heads_per_group >= 2
    masks = _heads_masks(space, 8, seed=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    got = MaskedModel(model).losses(ids, masks)
    want = hook_losses(model, ids, masks)
    rel = ((got - want).abs() / want.abs()).max().item()
    assert rel <= 1e-4, f"max relative error {rel:.2e}"
    assert want.unique().numel() >= 7  # the slots change the loss: an engine ignoring them fails above
    no_slots = Masks(masks.channels, masks.groups, masks.layers)
    assert not torch.allclose(hook_losses(model, ids, no_slots)[1:], want[1:])


def test_all_kept_slots_are_bit_for_bit_no_slots():
    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    masks = Masks.sample(Masks.probabilities(space, 0.7), 4, torch.Generator().manual_seed(2))
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    mm = MaskedModel(model)
    with_slots = Masks(masks.channels, masks.groups, masks.layers, torch.ones(4, 2, 3, dtype=torch.bool))
    assert torch.equal(mm.losses(ids, masks), mm.losses(ids, with_slots))
    assert with_slots == masks and torch.equal(space.params(with_slots), space.params(masks))


def test_hooks_zero_the_pruned_heads_before_o_proj():
    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    masks = Masks.full(space)
    masks.heads = torch.tensor([[[True, False, True], [False, False, False]]])
    seen = {}
    with hook_masks(model, masks):  # hooks registered after hook_masks' own see the input it masked
        handles = [layer.self_attn.o_proj.register_forward_pre_hook(
            lambda module, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
            for i, layer in enumerate(model.model.layers)]
        model(torch.randint(0, 300, (1, 9)))
    for h in handles:
        h.remove()
    hd = space.head_dim
    per_head = seen[0].view(1, 9, space.n_groups, space.heads_per_group, hd).abs().amax((0, 1, 4))
    assert (per_head[:, 1] == 0).all() and (per_head[:, [0, 2]] > 0).all()
    assert (seen[1] == 0).all()


def test_params_follow_slots_and_equal_the_compacted_model():
    model = tiny_model("qwen2", num_hidden_layers=3)  # q/k/v biases
    space = MaskSpace.from_model(model)
    masks = Masks.full(space)
    masks.heads = torch.tensor([[[True, False, True], [True, True, True], [False, False, False]]])
    masks.groups[0, 0, 1] = False
    # layer 0: one group with 2 of 3 heads; layer 1: whole; layer 2: no attention
    attn0 = space.kv_params + 2 * space.head_params + space.attention_fixed_params
    full = space.n_groups * space.group_params + space.attention_fixed_params
    expected = space.total_params - (full - attn0) - full
    assert int(space.params(masks)[0]) == expected
    small = compact_model(model, masks)
    assert sum(p.numel() for p in small.parameters()) == expected
    assert small.config.heads_per_group_per_layer == [2, 3, 0]
    assert small.config.kv_heads_per_layer == [1, 2, 0]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_compacted_heads_model_equals_the_masked_model(family, tmp_path, tokenizer):
    model = tiny_model(family, num_hidden_layers=3)
    space = MaskSpace.from_model(model)
    masks = Masks.full(space)
    masks.heads = torch.tensor([[[True, False, True], [False, True, True], [False, False, False]]])
    masks.groups[0, 1, 0] = False
    masks.channels[0, 2, :30] = False
    ids = torch.randint(0, model.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1))
    want = MaskedModel(model).logits(ids, masks)[0]
    small = compact_model(model, masks)
    with torch.no_grad():
        got = small(ids).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    folder = save_compacted(model, masks, tmp_path / "m", tokenizer=tokenizer)
    config = json.loads((folder / "config.json").read_text())
    assert config["heads_per_group_per_layer"] == [2, 2, 0] and config["kv_heads_per_layer"] == [2, 1, 0]
    record = json.loads((folder / "bpp_compaction.json").read_text())
    assert [layer["query_heads"] for layer in record["layers"]] == [4, 2, 0]  # layer 2 keeps only its MLP
    result = isolated_load(folder, ids, trust=True)  # plain transformers, bpp not importable
    assert result["cls"] == "BppPrunedForCausalLM"
    assert (torch.tensor(result["logits"]) - want).abs().max() <= 1e-4 * want.abs().max()
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    out = loaded.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)
    steps = small.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    assert torch.equal(out, steps)


def test_uniform_slots_give_a_stock_config(tmp_path):
    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    masks = Masks.full(space)
    masks.heads = torch.tensor([[[True, False, True], [False, True, True]]])
    small = compact_model(model, masks)
    assert not getattr(small.config, "auto_map", None)
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (4, 2)
    ids = torch.randint(0, 300, (1, 13))
    want = MaskedModel(model).logits(ids, masks)[0]
    with torch.no_grad():
        assert (small(ids).logits - want).abs().max() <= 1e-4 * want.abs().max()


def test_mask_files_keep_slots_and_old_files_load(tmp_path):
    space = MaskSpace.from_model(tiny_model("llama"))
    masks = Masks.full(space, 2)
    masks.heads = torch.tensor([[[True, False, True], [False, False, False]]] * 2)
    masks.save(tmp_path / "heads.safetensors")
    back = Masks.load(tmp_path / "heads.safetensors")
    assert back == masks and torch.equal(back.heads, masks.heads)
    old = Masks(masks.channels, masks.groups, masks.layers)
    old.save(tmp_path / "old.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "old.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["channels", "groups", "layers"]  # files without slots stay as they were
    assert Masks.load(tmp_path / "old.safetensors").heads is None
    cat = Masks.cat([old[0], masks[1]])
    assert cat.heads[0].all() and torch.equal(cat.heads[1], masks.heads[1])
    assert masks.effective().groups[0, 1].any().item() is False  # no slot: no attention


def test_a_heads_mask_of_the_wrong_size_is_one_line():
    space = MaskSpace.from_model(tiny_model("llama"))
    masks = Masks.full(space)
    masks.heads = torch.ones(1, 2, 2, dtype=torch.bool)
    with pytest.raises(BppError, match=r"masks.heads has shape \(1, 2, 2\).*3 query heads per group") as e:
        masks.validate(space)
    assert "\n" not in str(e.value)
    masks.heads = torch.ones(1, 2, 3)
    with pytest.raises(BppError, match="masks.heads must be a bool tensor"):
        masks.validate(space)


def test_gemma3_head_slots_match_the_hooks_and_compact():
    from tests.tiny import tiny_gemma3

    model = tiny_gemma3()
    space = MaskSpace.from_model(model)
    if space.heads_per_group < 2:
        pytest.skip("the tiny Gemma 3 has one query head per group")
    masks = _heads_masks(space, 4, seed=4)
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(3))
    got, want = MaskedModel(model).losses(ids, masks), hook_losses(model, ids, masks)
    assert ((got - want).abs() / want.abs()).max().item() <= 1e-4
    one = masks[1]
    logits = MaskedModel(model).logits(ids, one)[0]
    with torch.no_grad():
        small = compact_model(model, one)(ids).logits
    assert (small - logits).abs().max() <= 1e-4 * logits.abs().max()


def test_a_compacted_folder_with_too_many_heads_per_group_is_one_line(tmp_path, tokenizer):
    from bpp import load_model
    from tests.conftest import cli, one_line_error

    model = tiny_model("llama", num_hidden_layers=3)
    space = MaskSpace.from_model(model)
    masks = Masks.full(space)
    masks.heads = torch.tensor([[[True, False, True], [False, True, True], [True, True, True]]])
    masks.groups[0, 2, 0] = False
    folder = save_compacted(model, masks, tmp_path / "m", tokenizer=tokenizer)
    assert load_model(folder)[0].config.heads_per_group_per_layer == [2, 2, 3]
    config = json.loads((folder / "config.json").read_text())
    config["heads_per_group_per_layer"] = [2, 4, 3]  # the model has 3 query heads per group
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BppError, match="heads_per_group_per_layer must be at most num_attention_heads"):
        load_model(folder)
    one_line_error(*cli("export", str(folder), "--out", str(tmp_path / "m.gguf")), "heads_per_group_per_layer")


@pytest.mark.parametrize("extra", [[], ["--reconstruct", "--calib-windows", "2", "--calib-seq-len", "16"],
                                   ["--clap"]], ids=["plain", "reconstruct", "clap"])
def test_bpp_compact_takes_a_mask_with_slots(tiny_llama_dir, tiny_llama_loaded, tmp_path, extra):
    from bpp.space import model_fingerprint
    from tests.conftest import cli, one_line_error

    model = tiny_llama_loaded[0]
    masks = Masks.full(MaskSpace.from_model(model))
    masks.heads = torch.tensor([[[True, False, True], [False, False, True]]])
    masks.save(tmp_path / "mask.safetensors", model=model_fingerprint(model))
    args = ("compact", "--model", str(tiny_llama_dir), "--mask", str(tmp_path / "mask.safetensors"), "--out",
            str(tmp_path / "small"), *extra)
    if extra == ["--clap"]:
        one_line_error(*cli(*args), "prunes query heads inside KV groups")
        return
    code, err = cli(*args)
    assert code == 0, err
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    assert config["heads_per_group_per_layer"] == [2, 1]
    if not extra:  # the plain compaction equals the masked model
        from bpp import load_model

        small, _ = load_model(tmp_path / "small")
        ids = torch.randint(0, 300, (1, 11))
        want = MaskedModel(model).logits(ids, masks)[0]
        with torch.no_grad():
            assert (small(ids).logits - want).abs().max() <= 1e-4 * want.abs().max()
