"""BESA (blockwise learned sparsity allocation) on bpp's structured units: the differentiable
relaxation, the learned attention/MLP split, the parameter budget, the init and baseline paths."""
import pytest
import torch

from bpp.methods.besa import BesaConfig, besa_allocate, besa_mask, besa_prior
from bpp.methods.besa_relaxation import (candidate_counts, expected_count, expected_mask, hard_mask, init_logits,
                                         rescale_budgets, straight_through_mask)
from bpp.errors import BppError
from bpp.budget import Budget
from bpp.masks import Masks
from bpp.space import MaskSpace
from tests.tiny import check_calibrated_init, tiny_model

QUICK = BesaConfig(epochs=1, progress=False)


torch.manual_seed(0)


def _calib(n=4, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n, T), generator=g)


# --- the relaxation ----------------------------------------------------------------------------

def test_expected_mask_equals_the_hard_mask_at_one_hot_probabilities():
    counts = candidate_counts(10)
    assert counts.tolist() == list(range(11))
    for k in (0, 3, 10):
        probs = torch.nn.functional.one_hot(torch.tensor(k), 11).float()
        assert torch.equal(expected_mask(probs, counts, 10), hard_mask(k, 10))


def test_expected_mask_is_differentiable_and_its_sum_is_the_expected_count():
    counts = candidate_counts(10)
    logits = torch.randn(11, requires_grad=True)
    probs = torch.softmax(logits, 0)
    soft = expected_mask(probs, counts, 10)
    assert torch.all(soft[:-1] >= soft[1:])  # a better-ranked unit is at least as likely kept
    torch.testing.assert_close(soft.sum(), expected_count(probs, counts))
    weights = torch.linspace(1.0, -1.0, 10)  # a loss that rewards keeping the top units
    (soft * weights).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # more probability on larger counts keeps more of the top units: its logit gradient is larger
    assert logits.grad[5] > logits.grad[0]


def test_straight_through_mask_is_hard_forward_and_soft_backward():
    counts = candidate_counts(10)
    logits = torch.randn(11, requires_grad=True)
    ste = straight_through_mask(logits, counts, 10)
    k = int(torch.round(expected_count(torch.softmax(logits, 0), counts)))
    assert torch.equal(ste.detach(), hard_mask(k, 10))
    w = torch.randn(10)
    (ste * w).sum().backward()
    g_ste = logits.grad.clone()
    logits.grad = None
    (expected_mask(torch.softmax(logits, 0), counts, 10) * w).sum().backward()
    torch.testing.assert_close(g_ste, logits.grad)


def test_candidate_grid_and_initial_rate():
    counts = candidate_counts(1536, 0.01)
    assert counts[0] == 0 and counts[-1] == 1536 and len(counts) == 101 and torch.all(counts[1:] > counts[:-1])
    for n, keep in ((3, 0.8), (1536, 0.8), (70, 0.3)):
        c = candidate_counts(n)
        probs = torch.softmax(init_logits(c, n, keep).double(), 0)
        assert abs(float(expected_count(probs, c)) / n - keep) < 1e-4
        assert probs.min() > 0  # every candidate reachable by the gradient


def test_rescaled_block_budgets_sum_to_the_total_and_respect_a_block():
    budgets = rescale_budgets(torch.tensor([0.9, 0.5, 0.7, 0.99]), 10.0, 30.0)
    torch.testing.assert_close(budgets.sum(), torch.tensor(30.0, dtype=torch.float64))
    assert budgets.max() <= 10.0 + 1e-9
    assert budgets[1] < budgets[2] < budgets[0] <= budgets[3]


# --- the learned allocation ----------------------------------------------------------------------

@pytest.mark.parametrize("cheap", ["mlp", "attention"])
def test_allocation_moves_toward_the_type_that_is_free_to_prune(cheap):
    # 6 KV groups (MHA) so the attention split is not too coarse; one type's output is shrunk
    # 1000x, so pruning it costs (almost) nothing in reconstruction and BESA should take it first
    model = tiny_model("llama", num_key_value_heads=6)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.down_proj.weight if cheap == "mlp" else layer.self_attn.o_proj.weight
            w.mul_(1e-3)
    space = MaskSpace.from_model(model)
    keep = 0.7
    config = BesaConfig(epochs=10, batch_size=2, lr=0.05, penalty=5.0, across_blocks=False, progress=False)
    result = besa_allocate(model, space, _calib(8, 32), keep, config=config)
    uniform_groups, uniform_channels = round(keep * 6), round(keep * space.n_channels)
    kept_groups, kept_channels = result.masks["group"].sum(-1), result.masks["channel"].sum(-1)
    if cheap == "mlp":
        assert torch.all(result.learned_rates["group"] > keep) and torch.all(result.learned_rates["channel"] < keep)
        assert torch.all(kept_groups > uniform_groups) and torch.all(kept_channels < uniform_channels)
    else:
        assert torch.all(result.learned_rates["group"] < keep) and torch.all(result.learned_rates["channel"] > keep)
        assert torch.all(kept_groups < uniform_groups) and torch.all(kept_channels > uniform_channels)
    # the block's parameter budget holds whichever way it splits
    assert torch.all((result.block_keep - keep).abs() < 0.05)


@pytest.mark.parametrize("sparsity", [0.2, 0.35, 0.6])
def test_besa_mask_meets_the_parameter_budget(tiny, sparsity):
    space = MaskSpace.from_model(tiny)
    mask = besa_mask(tiny, space, _calib(), sparsity, QUICK)
    mask.validate(space)
    assert mask.S == 1 and mask.layers.all()
    kept = int(space.params(mask)[0])
    target = space.total_params - sparsity * space.prunable_params  # the --budget params target
    assert abs(kept - target) <= space.channel_params
    budget = Budget(space, "channel,group", sparsity)
    pg = int(space.params(budget.final_mask(torch.ones(budget.n_units)))[0])  # the count budget
    assert abs(kept - pg) <= space.group_params


def test_across_blocks_prunes_the_block_that_is_free_to_prune_and_meets_the_budget():
    # block 1's attention and MLP outputs shrunk 1000x: pruning it costs (almost) nothing
    model = tiny_model("qwen2", num_hidden_layers=3)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-3)
        model.model.layers[1].self_attn.o_proj.weight.mul_(1e-3)
    space = MaskSpace.from_model(model)
    result = besa_allocate(model, space, _calib(8, 32), 0.6, config=BesaConfig(progress=False))
    assert result.block_keep[1] < result.block_keep[0] and result.block_keep[1] < result.block_keep[2]
    mask = Masks(result.masks["channel"][None], result.masks["group"][None], torch.ones(1, 3, dtype=torch.bool))
    kept = int(space.params(mask)[0])
    assert abs(kept - (space.total_params - 0.4 * space.prunable_params)) <= space.channel_params
    per_block = (result.masks["channel"].sum(-1) * space.channel_params
                 + result.masks["group"].sum(-1) * space.group_params)
    assert per_block[1] < per_block[0] and per_block[1] < per_block[2]
    # with per-block budgets (the official method) every block keeps the same parameters
    per_block_result = besa_allocate(model, space, _calib(8, 32), 0.6,
                                     config=BesaConfig(across_blocks=False, progress=False))
    fixed = (per_block_result.masks["channel"].sum(-1) * space.channel_params
             + per_block_result.masks["group"].sum(-1) * space.group_params)
    assert (fixed.max() - fixed.min()) <= 2 * space.channel_params  # rounding to whole channels


# --- the init and baseline paths -----------------------------------------------------------------

def test_besa_prior_shapes_ranges_and_layer_rates():
    model = tiny_model("mistral")
    space = MaskSpace.from_model(model)
    theta, layer_masks, metrics = besa_prior(model, space, _calib(), 0.7, ("channel", "group"), QUICK)
    L = space.n_layers
    assert theta["channel"].shape == (L, space.n_channels) and theta["group"].shape == (L, space.n_groups)
    assert layer_masks["channel"].shape == (L, space.n_channels) and layer_masks["channel"].dtype == torch.bool
    assert layer_masks["group"].shape == (L, space.n_groups)
    for t in ("channel", "group"):
        assert theta[t].min() >= 0 and theta[t].max() <= 1
        rates = metrics[f"{t}_keep_rate"]
        torch.testing.assert_close(rates, layer_masks[t].double().mean(-1))
        assert metrics[t].shape == theta[t].shape
        # the prior ranks units like the metric, around the layer's learned keep rate
        for i in range(L):
            assert theta[t][i].argmax() == metrics[t][i].argmax()
            if 0 < rates[i] < 1:
                assert abs(float(theta[t][i].mean()) - float(rates[i])) < 0.1
        assert metrics[f"{t}_learned_rate"].shape == (L,)


def test_besa_prior_channel_only_keeps_every_group():
    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    theta, layer_masks, _ = besa_prior(model, space, _calib(), 0.6, ("channel",), QUICK)
    assert layer_masks["group"].all() and torch.all(theta["group"] == 1)
    assert abs(float(layer_masks["channel"].double().mean()) - 0.6) <= 1 / (space.n_layers * space.n_channels)


def test_registry_initialise_with_besa():
    space, init_mask, metrics = check_calibrated_init("besa", "qwen3", _calib())
    kept = int(space.params(init_mask)[0])
    assert abs(kept - (space.total_params - 0.3 * space.prunable_params)) <= space.channel_params
    assert "group_keep_rate" in metrics


def test_run_baseline_writes_mask_and_compacted_model(tmp_path, tokenizer):
    from bpp.jobs.baseline import baseline

    model = tiny_model("llama")
    report = baseline("besa", 0.3, tmp_path / "out", model=model, tokenizer=tokenizer, calib_windows=4,
                          calib_seq_len=32, eval_windows=2)
    mask = Masks.load(tmp_path / "out" / "mask.safetensors")
    space = MaskSpace.from_model(model)
    assert int(space.params(mask)[0]) == report["params"]["final_mask"]["params"]
    assert abs(report["params"]["final_mask"]["params"] - (space.total_params - 0.3 * space.prunable_params)) \
        <= space.channel_params
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert report["config"]["method"] == "besa" and report["perplexity"]["final_mask"] > 1


def test_the_input_model_is_left_unchanged():
    model = tiny_model("qwen2")
    model.train()  # flags must come back as they were
    model.model.layers[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    with torch.no_grad():  # callers may hold no_grad; BESA turns gradients on for its logits
        besa_mask(model, MaskSpace.from_model(model), _calib(), 0.3, QUICK)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [m.training for m in model.modules()]
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_bad_input_is_a_clear_error():
    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    for sparsity in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(BppError, match="sparsity"):
            besa_mask(model, space, _calib(), sparsity, QUICK)
    with pytest.raises(BppError, match="at least one calibration window"):
        besa_mask(model, space, torch.empty(0, 16, dtype=torch.long), 0.3, QUICK)
    with pytest.raises(BppError, match="integer tensor"):
        besa_mask(model, space, torch.rand(4, 16), 0.3, QUICK)
    with pytest.raises(BppError, match="integer tensor"):
        besa_mask(model, space, torch.arange(16), 0.3, QUICK)
    with pytest.raises(BppError, match="token ids"):
        besa_mask(model, space, torch.full((2, 8), 10_000), 0.3, QUICK)
    with pytest.raises(BppError, match="epochs"):
        besa_mask(model, space, _calib(), 0.3, BesaConfig(epochs=0))
    with pytest.raises(BppError, match="penalty"):
        besa_mask(model, space, _calib(), 0.3, BesaConfig(penalty=0.0))


# --- the two engines: bpp_kernels' masked ops and the Hugging Face layer with hooks ---------------

@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_kernels_and_hooks_learn_the_same_allocation(family):
    """The masked ops (per-unit scales, every unit kept while learning, pruned units skipped in the
    fixed-mask pass) and the Hugging Face layer with scaled projection inputs compute the same
    block: same masks, learned rates and losses within fp32 rounding."""
    model = tiny_model(family, num_hidden_layers=3)
    space = MaskSpace.from_model(model)
    calib = _calib(6, 24, seed=1)
    config = dict(epochs=2, progress=False)
    hf = besa_allocate(model, space, calib, 0.6, config=BesaConfig(engine="hf", **config))
    kernels = besa_allocate(model, space, calib, 0.6, config=BesaConfig(engine="kernels", **config))
    assert hf.engine == "hf" and kernels.engine == "kernels"
    for t in ("group", "channel"):
        assert torch.equal(hf.masks[t], kernels.masks[t]), t
        torch.testing.assert_close(kernels.learned_rates[t], hf.learned_rates[t], rtol=0, atol=1e-5)
    torch.testing.assert_close(kernels.block_keep, hf.block_keep, rtol=0, atol=1e-5)
    torch.testing.assert_close(kernels.reconstruction, hf.reconstruction, rtol=1e-4, atol=1e-9)
    losses = lambda r: torch.tensor([h["loss"] for h in r.history], dtype=torch.float64)  # noqa: E731
    assert len(hf.history) == len(kernels.history) == 3 * 2 * 3
    torch.testing.assert_close(losses(kernels), losses(hf), rtol=1e-4, atol=1e-9)
    assert hf.masks["channel"].float().mean() < 1  # something was pruned: the fixed-mask pass skipped units


def test_auto_engine_takes_the_kernels_where_they_compute_the_layer_and_hooks_elsewhere():
    calib = _calib(4, 16)
    auto = BesaConfig(epochs=1, progress=False)
    model = tiny_model("llama")
    assert besa_allocate(model, MaskSpace.from_model(model), calib, 0.7, config=auto).engine == "kernels"
    # a GELU MLP and a sliding window shorter than the windows are Hugging Face features the ops lack
    for family, overrides, reason in (("llama", dict(hidden_act="gelu"), "activation is gelu"),
                                      ("mistral", dict(sliding_window=8), "sliding window")):
        model = tiny_model(family, **overrides)
        space = MaskSpace.from_model(model)
        result = besa_allocate(model, space, calib, 0.7, config=auto)
        assert result.engine == "hf" and result.masks["channel"].sum() < result.masks["channel"].numel()
        with pytest.raises(BppError, match=f"cannot run through bpp_kernels: .*{reason}"):
            besa_allocate(model, space, calib, 0.7, config=BesaConfig(epochs=1, progress=False, engine="kernels"))
    # the same window length within the sliding window runs on the kernels
    model = tiny_model("mistral", sliding_window=16)
    assert besa_allocate(model, MaskSpace.from_model(model), calib, 0.7, config=auto).engine == "kernels"
    with pytest.raises(BppError, match="engine must be one of"):
        besa_mask(model, MaskSpace.from_model(model), calib, 0.3, BesaConfig(engine="triton"))


def test_besa_allocation_is_kept_and_read_back_for_the_same_model_windows_and_options(tmp_path, monkeypatch):
    """A second BESA on the same model, windows and options reads the first one's result back
    (bpp.results_cache); other windows, another keep rate or other weights compute again."""
    import bpp.methods.besa as besa
    from bpp.methods.besa import BesaConfig, besa_allocate

    monkeypatch.setenv("BPP_CACHE", str(tmp_path))
    monkeypatch.setenv("BPP_RESULTS_CACHE", "1")
    calls = []
    compute = besa._allocate
    monkeypatch.setattr(besa, "_allocate", lambda *a, **k: calls.append(1) or compute(*a, **k))
    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    calib = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    config = BesaConfig(epochs=1, progress=False)
    first = besa_allocate(model, space, calib, 0.7, config=config)
    again = besa_allocate(model, space, calib, 0.7, config=BesaConfig(epochs=1, progress=True))
    assert len(calls) == 1 and len(list((tmp_path / "besa").glob("*.pt"))) == 1
    for t in first.masks:
        assert torch.equal(first.masks[t], again.masks[t]) and torch.equal(first.scores[t], again.scores[t])
    assert torch.equal(first.reconstruction, again.reconstruction) and first.history == again.history
    besa_allocate(model, space, calib, 0.6, config=config)  # another keep rate
    besa_allocate(model, space, calib.flip(0), 0.7, config=config)  # other windows
    besa_allocate(model, space, calib, 0.7, config=BesaConfig(epochs=2, progress=False))  # other options
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    besa_allocate(model, space, calib, 0.7, config=config)  # other weights
    assert len(calls) == 5
