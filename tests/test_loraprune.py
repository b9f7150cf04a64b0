"""LoRAPrune on bpp's structured units: the LoRA-gradient importance against the dense gradient,
the iterative schedule, the per-type budget, the init and baseline paths."""
import pytest
import torch

from bpp.errors import BppError
from bpp.methods.loraprune import (LoRAPruneConfig, _unit_importance, loraprune_allocate, loraprune_prior, loraprune_mask,
                           schedule)
from bpp.masks import Masks
from bpp.space import MaskSpace
from tests.tiny import check_calibrated_init, seed_for_test, tiny_model

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _proj(layer, name):
    return getattr(layer.self_attn if name in PROJ[:4] else layer.mlp, name)


QUICK = LoRAPruneConfig(rounds=2, steps_per_round=2, batch_size=2, progress=False)


def _calib(n=4, T=16, seed=None):
    g = torch.Generator().manual_seed(seed_for_test(n, T) if seed is None else seed)
    return torch.randint(3, 300, (n, T), generator=g)


def test_schedule_is_cubic_monotone_and_ends_at_the_target():
    ks = [schedule(30, 100, r, 5) for r in range(0, 6)]
    assert ks[0] == 100 and ks[-1] == 30
    assert all(a >= b for a, b in zip(ks, ks[1:]))
    assert ks[0] - ks[1] > ks[4] - ks[5]  # most of the pruning comes early


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_unit_importance_equals_the_lora_estimate_of_the_dense_gradient(family):
    """With random A and B, s·(∂L/∂B·A + B·∂L/∂A) = s²·(g·AᵀA + BBᵀ·g) where g = ∂L/∂W' is the
    gradient of the merged weight; the unit scores sum |W' ⊙ G| over the unit's weights."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed_for_test(family))
    model = tiny_model(family).float()
    space = MaskSpace.from_model(model)
    dense = tiny_model(family).float()
    dense.load_state_dict(model.state_dict())
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                    target_modules=list(PROJ)))
    for module in wrapped.modules():
        if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)
    ids = _calib(2, 12)
    wrapped(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    got = _unit_importance(model.model.layers[1], space)

    # the same model with the adapters merged into plain weights: the gradient of those weights
    with torch.no_grad():
        for dl, wl in zip(dense.model.layers, model.model.layers):
            for n in PROJ:
                src, dst = _proj(wl, n), _proj(dl, n)
                A, B, s = src.lora_A["default"].weight, src.lora_B["default"].weight, src.scaling["default"]
                dst.weight.copy_(src.base_layer.weight + s * B @ A)
    dense(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    sal = {}
    for n in PROJ:
        src, dst = _proj(model.model.layers[1], n), _proj(dense.model.layers[1], n)
        A = src.lora_A["default"].weight.detach().double()
        B = src.lora_B["default"].weight.detach().double()
        s = src.scaling["default"]
        g = dst.weight.grad.double()
        G = s * s * (g @ A.T @ A + B @ B.T @ g)
        sal[n] = (dst.weight.detach().double() * G).abs()
    G_, r, hd = space.n_groups, space.heads_per_group, space.head_dim
    channel = sal["gate_proj"].sum(1) + sal["up_proj"].sum(1) + sal["down_proj"].sum(0)
    group = (sal["q_proj"].sum(1).reshape(G_, r * hd).sum(1) + sal["k_proj"].sum(1).reshape(G_, hd).sum(1)
             + sal["v_proj"].sum(1).reshape(G_, hd).sum(1) + sal["o_proj"].sum(0).reshape(G_, r * hd).sum(1))
    torch.testing.assert_close(got["channel"], channel, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(got["group"], group, rtol=1e-4, atol=1e-9)
    assert got["channel"].min() > 0  # random inputs: every unit has a nonzero score


def test_iterative_pruning_meets_per_type_counts_and_is_nested():
    model = tiny_model("qwen3")
    space = MaskSpace.from_model(model)
    config = LoRAPruneConfig(rounds=3, steps_per_round=2, batch_size=2, progress=False)
    result = loraprune_allocate(model, space, _calib(), 0.55, config=config)
    L = space.n_layers
    assert int(result.masks["channel"].sum()) == round(0.55 * L * space.n_channels)
    assert int(result.masks["group"].sum()) == round(0.55 * L * space.n_groups)
    kept = [h["kept_channels"] for h in result.history]
    assert kept[0] == L * space.n_channels and all(a >= b for a, b in zip(kept, kept[1:]))
    assert len(result.history) == 6 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    # a kept unit's moving-average score is at least that of the pruned units of its layer after
    # the last round's estimate, within the schedule's last step
    assert result.scores["channel"].min() >= 0


def test_channels_without_weights_are_pruned_first():
    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    dead = torch.tensor([3, 17, 40])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[dead] = 0
            layer.mlp.up_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[:, dead] = 0
    mask = loraprune_mask(model, space, _calib(), 0.2, QUICK)
    assert not mask.channels[0][:, dead].any()
    assert mask.channels[0].any(-1).all()


def test_mask_meets_the_parameter_budget_of_a_pg_mask():
    model = tiny_model("mistral")
    space = MaskSpace.from_model(model)
    mask = loraprune_mask(model, space, _calib(), 0.3, QUICK)
    assert mask.S == 1 and mask.layers.all()
    for t, n in (("channels", space.n_channels), ("groups", space.n_groups)):
        assert int(getattr(mask, t).sum()) == round(0.7 * space.n_layers * n)
    assert abs(int(space.params(mask)[0]) - (space.total_params - 0.3 * space.prunable_params)) <= space.group_params


def test_init_theta_ranks_the_mask_first_and_channel_only_keeps_groups():
    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    theta, masks, metrics = loraprune_prior(model, space, _calib(), 0.6, ("channel",), QUICK)
    assert masks["group"].all() and torch.equal(theta["group"], torch.ones_like(theta["group"]))
    t = theta["channel"]
    assert t.shape == (space.n_layers, space.n_channels) and t.min() >= 0 and t.max() <= 1
    for i in range(space.n_layers):  # every kept unit at least as likely as every pruned one
        assert t[i][masks["channel"][i]].min() >= t[i][~masks["channel"][i]].max()
    assert metrics["loss"].numel() == 4


def test_registry_initialise_with_loraprune():
    check_calibrated_init("loraprune", "qwen2", _calib())


def test_run_baseline_loraprune(tmp_path, tokenizer):
    from bpp.jobs.baseline import baseline

    model = tiny_model("llama")
    report = baseline("loraprune", 0.3, tmp_path / "out", model=model, tokenizer=tokenizer, calib_windows=4,
                          calib_seq_len=32, eval_windows=2)
    mask = Masks.load(tmp_path / "out" / "mask.safetensors")
    assert int(MaskSpace.from_model(model).params(mask)[0]) == report["params"]["final_mask"]["params"]
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert report["config"]["method"] == "loraprune" and report["perplexity"]["final_mask"] > 1


def test_the_input_model_is_left_unchanged():
    model = tiny_model("qwen3")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    with torch.no_grad():
        loraprune_mask(model, MaskSpace.from_model(model), _calib(), 0.3, QUICK)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags
    assert not any(p.grad is not None for p in model.parameters())
    assert not any("lora" in n for n, _ in model.named_modules())


def test_bad_inputs_raise_clear_errors():
    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    with pytest.raises(BppError, match="sparsity"):
        loraprune_mask(model, space, _calib(), 1.0, QUICK)
    with pytest.raises(BppError, match="integer tensor"):
        loraprune_mask(model, space, torch.rand(4, 16), 0.3, QUICK)
    with pytest.raises(BppError, match="token ids"):
        loraprune_mask(model, space, torch.full((2, 8), 10_000), 0.3, QUICK)
    with pytest.raises(BppError, match="rounds"):
        loraprune_mask(model, space, _calib(), 0.3, LoRAPruneConfig(rounds=0))
    with pytest.raises(BppError, match="ema"):
        loraprune_mask(model, space, _calib(), 0.3, LoRAPruneConfig(ema=1.0))
    with pytest.raises(BppError, match="KV group"):
        loraprune_allocate(model, space, _calib(), 0.1, config=QUICK)
    with pytest.raises(BppError, match="layers"):
        loraprune_allocate(model, space, _calib(), 0.5, ("layer",), QUICK)


def test_the_mask_does_not_depend_on_the_callers_random_state():
    """The adapters' random init is seeded by the config: the same inputs give the same mask
    whatever ran before in the process, and the caller's RNG is left as it was."""
    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    calib = _calib(seed=3)
    torch.manual_seed(1)
    first = loraprune_mask(model, space, calib, 0.3, QUICK)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    second = loraprune_mask(model, space, calib, 0.3, QUICK)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.channels, second.channels) and torch.equal(first.groups, second.groups)


# --- the two engines: bpp_kernels' masked ops and the peft model's forward with hooks --------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_kernels_and_hooks_give_the_same_importance_and_masks(family):
    """The ops on the adapted weights W + s·B·A, pruned units skipped, and the peft model with the
    pruned units' outputs scaled to zero: the same LoRA gradients, so the same moving-average
    importance (within fp32 rounding), the same losses and the same masks round after round."""
    model = tiny_model(family)
    space = MaskSpace.from_model(model)
    calib = _calib(6, 16)
    config = dict(rounds=3, steps_per_round=2, batch_size=2, progress=False)
    hf = loraprune_allocate(model, space, calib, 0.55, config=LoRAPruneConfig(engine="hf", **config))
    kernels = loraprune_allocate(model, space, calib, 0.55, config=LoRAPruneConfig(engine="kernels", **config))
    assert hf.engine == "hf" and kernels.engine == "kernels"
    for t in ("channel", "group"):
        assert torch.equal(hf.masks[t], kernels.masks[t]), t
        torch.testing.assert_close(kernels.scores[t], hf.scores[t], rtol=1e-4, atol=1e-9 * float(hf.scores[t].max()))
    assert [h["kept_channels"] for h in hf.history] == [h["kept_channels"] for h in kernels.history]
    torch.testing.assert_close(torch.tensor([h["loss"] for h in kernels.history]),
                               torch.tensor([h["loss"] for h in hf.history]), rtol=1e-5, atol=0)
    assert hf.history[-1]["kept_channels"] < hf.history[0]["kept_channels"]  # later steps ran pruned


def test_auto_engine_runs_the_peft_model_where_the_kernels_cannot():
    calib = _calib(4, 16)
    model = tiny_model("mistral", sliding_window=8)  # a window shorter than the calibration windows
    space = MaskSpace.from_model(model)
    assert loraprune_allocate(model, space, calib, 0.7, config=QUICK).engine == "hf"
    with pytest.raises(BppError, match="cannot run through bpp_kernels: .*sliding window"):
        loraprune_allocate(model, space, calib, 0.7, config=LoRAPruneConfig(engine="kernels", progress=False))
    model = tiny_model("mistral", sliding_window=16)
    assert loraprune_allocate(model, MaskSpace.from_model(model), calib, 0.7, config=QUICK).engine == "kernels"
    with pytest.raises(BppError, match="engine must be one of"):
        loraprune_mask(model, space, calib, 0.3, LoRAPruneConfig(engine="fast"))
