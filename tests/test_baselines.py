"""FLAP baseline: fluctuation scores, the global heterogeneous mask, bias compensation."""
import pytest
import torch

from bpp.bias_compensation import InputStats
from bpp.methods.flap import compensation_biases, flap_mask, flap_scores
from bpp.errors import BppError
from bpp.space import MaskSpace


def _inputs(tiny, n=6, T=17):
    return torch.randint(0, tiny.config.vocab_size, (n, T))


def test_flap_scores_equal_variance_times_column_norm(tiny):
    ids = _inputs(tiny)
    stats = InputStats(tiny).collect(ids, batch_size=4)  # two batches: the running sums must merge
    captured = {}
    layer = tiny.model.layers[1]
    h1 = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("mlp", a[0]))
    h2 = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("attn", a[0]))
    with torch.no_grad():
        tiny(ids)
    h1.remove(), h2.remove()
    channel, group = flap_scores(tiny, stats)
    x = captured["mlp"].reshape(-1, captured["mlp"].shape[-1]).double()
    expected = x.var(0) * layer.mlp.down_proj.weight.double().pow(2).sum(0)
    torch.testing.assert_close(channel[1], expected, rtol=1e-6, atol=1e-9)
    a = captured["attn"].reshape(-1, captured["attn"].shape[-1]).double()
    per_col = a.var(0) * layer.self_attn.o_proj.weight.double().pow(2).sum(0)
    torch.testing.assert_close(group[1], per_col.view(group.shape[1], -1).sum(1), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("sparsity", [0.2, 0.5])
def test_flap_mask_meets_the_parameter_budget(tiny, sparsity):
    space = MaskSpace.from_model(tiny)
    mask = flap_mask(tiny, _inputs(tiny), sparsity)
    mask.validate(space)
    assert mask.S == 1 and mask.layers.all()
    kept = mask.channels.sum() * space.channel_params + mask.groups.sum() * space.group_params
    budget = (1 - sparsity) * space.prunable_params
    assert budget - space.group_params < kept <= budget  # within one unit of the budget, never over


def test_flap_mask_rejects_bad_sparsity(tiny):
    with pytest.raises(BppError, match="sparsity"):
        flap_mask(tiny, _inputs(tiny), 1.0)


def test_bias_compensation_restores_the_mean_output(tiny):
    ids = _inputs(tiny)
    stats = InputStats(tiny).collect(ids)
    mask = flap_mask(tiny, ids, 0.5, stats=stats)
    attn_bias, mlp_bias = compensation_biases(tiny, mask, stats)
    # with each layer's own (unpruned) inputs, the pruned output plus the bias has the same mean
    # over the calibration tokens as the full output: the compensation is exact on average
    inputs = {}
    hooks = [l.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
             for i, l in enumerate(tiny.model.layers)]
    with torch.no_grad():
        tiny(ids)
    for h in hooks:
        h.remove()
    for i, layer in enumerate(tiny.model.layers):
        x = inputs[i].reshape(-1, inputs[i].shape[-1])
        full = x @ layer.mlp.down_proj.weight.t()
        pruned = (x * mask.channels[0, i]) @ layer.mlp.down_proj.weight.t() + mlp_bias[i]
        torch.testing.assert_close(pruned.mean(0), full.mean(0), rtol=1e-4, atol=1e-5)
        assert attn_bias[i].shape == (tiny.config.hidden_size,)
        assert (mlp_bias[i] != 0).any()


@pytest.mark.parametrize("method", ["flap", "wanda-sp", "magnitude"])
def test_baseline_command_writes_a_run_that_report_reads(tmp_path, tokenizer, method):
    from typer.testing import CliRunner

    from bpp.cli import app
    from bpp.jobs.report import write_report
    from tests.tiny import tiny_model

    model_dir = tmp_path / "m"
    tiny_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / method
    result = CliRunner().invoke(app, ["baseline", "--method", method, "--model", str(model_dir), "--sparsity", "0.3",
                                      "--out", str(out), "--calib-windows", "4", "--calib-seq-len", "32",
                                      "--eval-windows", "3"])
    assert result.exit_code == 0, result.output
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["config"]["method"] == method
    space = MaskSpace.from_model(tiny_model("llama"))
    kept = report["params"]["final_mask"]["params"]
    target = space.total_params - 0.3 * space.prunable_params
    assert abs(kept - target) <= space.group_params  # the same parameter count as a PG mask
    assert (out / "model" / "config.json").is_file() and report["perplexity"]["final_mask"] > 1
    md, _ = write_report([out], tmp_path / "rep")
    assert method in md.read_text()


def test_flap_standardises_within_each_layer(tiny):
    """AL-AM as FLAP's code runs it: each layer's scores are standardised on their own, so scaling
    one layer's down_proj (its WIFV scores by a constant) leaves every score and the mask as they were."""
    from bpp.methods.flap import flap_alam_scores

    ids = _inputs(tiny)
    stats = InputStats(tiny).collect(ids)
    channel, group = flap_alam_scores(tiny, stats)
    torch.testing.assert_close(channel.mean(-1), torch.zeros(channel.shape[0], dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(channel.std(-1), torch.ones(channel.shape[0], dtype=torch.float64), atol=1e-9, rtol=0)
    before = flap_mask(tiny, ids, 0.3, stats=stats)
    with torch.no_grad():
        tiny.model.layers[0].mlp.down_proj.weight.mul_(4.0)  # a power of two: exact in fp32
    channel2, group2 = flap_alam_scores(tiny, stats)  # same inputs, scaled weights
    torch.testing.assert_close(channel2, channel, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(group2, group, rtol=1e-9, atol=1e-9)
    assert torch.equal(flap_mask(tiny, ids, 0.3, stats=stats).channels, before.channels)


def test_flap_as_init_starts_from_flaps_own_mask():
    """``--init flap``: the init mask is FLAP's mask at that sparsity, θ follows each layer's keep rate."""
    from tests.tiny import check_calibrated_init, tiny_model

    calib = torch.randint(0, 301, (4, 17), generator=torch.Generator().manual_seed(7))
    space, init_mask, metrics = check_calibrated_init("flap", "llama", calib, sparsity=0.3)
    want = flap_mask(tiny_model("llama"), calib, 0.3)
    assert torch.equal(init_mask.channels, want.channels) and torch.equal(init_mask.groups, want.groups)
    assert metrics["channel"].shape == (space.n_layers, space.n_channels)
