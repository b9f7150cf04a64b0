"""Least-squares reconstruction of pruned layers: the refit equals a direct least-squares solve on
explicitly stored activations of the already-pruned model, tends to FLAP's bias as the damping
grows, and the compacted, reconstructed model loads with plain transformers."""
import copy
import json

import pytest
import torch

from bpp.compaction import compact_model, save_compacted
from bpp.errors import BppError
from bpp.reconstruction import reconstruct
from bpp.masks import Masks
from bpp.space import MaskSpace
from tests.tiny import FAMILIES, seed_for_test, tiny_model


def _mask(space: MaskSpace, seed: int) -> Masks:
    """Channels and KV groups pruned in both layers (each layer keeps one of its two groups)."""
    g = torch.Generator().manual_seed(seed)
    channels = torch.rand(1, space.n_layers, space.n_channels, generator=g) < 0.55
    channels[0, :, :3] = True
    groups = torch.zeros(1, space.n_layers, space.n_groups, dtype=torch.bool)
    groups[0, 0, 0] = True
    groups[0, 1, 1] = True
    return Masks(channels, groups, torch.ones(1, space.n_layers, dtype=torch.bool))


def _calib(model, n=6, T=23, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, T), generator=torch.Generator().manual_seed(seed))


def _lstsq_fit(x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, damping: float):
    """min ||X Wᵀ + b − Y||² + δ||W − W₀||² with δ = damping · mean(diag(X_cᵀ X_c)), by
    ``torch.linalg.lstsq`` on the stacked system [X 1; √δ I 0] [Wᵀ; bᵀ] = [Y; √δ W₀ᵀ]."""
    n, k = x.shape
    xc = x - x.mean(0)
    delta = damping * float((xc * xc).sum(0).mean())
    a = torch.cat([torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1),
                   torch.cat([delta ** 0.5 * torch.eye(k, dtype=x.dtype), torch.zeros(k, 1, dtype=x.dtype)], 1)])
    rhs = torch.cat([y, delta ** 0.5 * w0.T])
    sol = torch.linalg.lstsq(a, rhs, driver="gelsd").solution
    return sol[:k].T, sol[k]


def _with_bias(linear: torch.nn.Linear) -> torch.nn.Linear:
    new = torch.nn.Linear(linear.in_features, linear.out_features, bias=True, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight)
        new.bias.zero_()
    return new


@torch.no_grad()
def _reference(model, mask: Masks, calib: torch.Tensor, damping: float, dense_inputs: bool = False,
               residual: bool = False):
    """The refit the slow, explicit way: a full-size copy of the model with the pruned columns of
    o_proj / down_proj zeroed (= the masked model); per layer, o_proj then down_proj, run the whole
    copy on ``calib``, store the projection's kept inputs (from the copy, whose layers below are
    already refit; or from the dense model when ``dense_inputs``) and the dense model's outputs of
    that projection (with ``residual``, plus the dense model's residual stream minus the copy's
    where the block's output is added: the layer's input for o_proj, the MLP norm's input for
    down_proj), solve by lstsq, write the result into the copy. Returns the copy and the fits
    ``{(layer, name): (W, b)}``."""
    space = MaskSpace.from_model(model)
    cols = space.heads_per_group * space.head_dim
    work = copy.deepcopy(model)
    keep = {}
    for i, layer in enumerate(work.model.layers):
        keep[i, "o_proj"] = mask.groups[0, i].repeat_interleave(cols)
        keep[i, "down_proj"] = mask.channels[0, i]
        layer.self_attn.o_proj = _with_bias(layer.self_attn.o_proj)
        layer.mlp.down_proj = _with_bias(layer.mlp.down_proj)
        layer.self_attn.o_proj.weight[:, ~keep[i, "o_proj"]] = 0
        layer.mlp.down_proj.weight[:, ~keep[i, "down_proj"]] = 0

    def proj(m, i, name):
        layer = m.model.layers[i]
        return layer.self_attn.o_proj if name == "o_proj" else layer.mlp.down_proj

    def record(module, store, inputs: bool):
        def hook(mod, args, out):
            store.append((args[0] if inputs else out).reshape(-1, (args[0] if inputs else out).shape[-1]))
        return module.register_forward_hook(hook)

    def stream(m, i, name, store):
        layer = m.model.layers[i]
        at = layer if name == "o_proj" else layer.post_attention_layernorm
        return at.register_forward_pre_hook(lambda mod, args: store.append(args[0].reshape(-1, args[0].shape[-1])))

    fits = {}
    for i in range(space.n_layers):
        for name in ("o_proj", "down_proj"):
            xs, ys, dense_stream, work_stream = [], [], [], []
            handles = [record(proj(model if dense_inputs else work, i, name), xs, True),
                       record(proj(model, i, name), ys, False)]
            if residual:
                handles += [stream(model, i, name, dense_stream), stream(work, i, name, work_stream)]
            work(calib)
            model(calib)
            for h in handles:
                h.remove()
            x, y = torch.cat(xs)[:, keep[i, name]], torch.cat(ys)
            if residual:
                y = y + torch.cat(dense_stream) - torch.cat(work_stream)
            w0 = proj(model, i, name).weight[:, keep[i, name]]
            w, b = _lstsq_fit(x, y, w0, damping)
            proj(work, i, name).weight[:, keep[i, name]] = w
            proj(work, i, name).bias.copy_(b)
            fits[i, name] = (w, b)
    return work, fits


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "output"])
@pytest.mark.parametrize("family", FAMILIES)
def test_refit_equals_a_direct_least_squares_solve_on_pruned_model_inputs(family, residual):
    seed = seed_for_test() % 10_000
    model = tiny_model(family, seed=seed, dtype=torch.float64)
    space = MaskSpace.from_model(model)
    mask = _mask(space, seed)
    calib = _calib(model, seed=seed)
    # two batches: sums over batches; residual targets are the default on these architectures
    got = reconstruct(model, mask, calib, damping=0.01, batch_size=4, **({} if residual else {"residual": False}))
    assert got.residual == residual
    work, want = _reference(model, mask, calib, 0.01, residual=residual)
    for i in range(space.n_layers):
        assert _rel(got.o_proj_weight[i], want[i, "o_proj"][0]) < 1e-8, i
        assert _rel(got.o_proj_bias[i], want[i, "o_proj"][1]) < 1e-8, i
        assert _rel(got.down_proj_weight[i], want[i, "down_proj"][0]) < 1e-8, i
        assert _rel(got.down_proj_bias[i], want[i, "down_proj"][1]) < 1e-8, i
        for name in ("o_proj", "down_proj"):  # on the calibration tokens the refit only gains
            err = got.errors[i][name]
            assert err["refit"] <= err["bias"] <= err["masked"], (i, name, err)
    # the compacted model is the refit full-size model: same logits
    ids = _calib(model, 3, 17, seed + 1)
    small = compact_model(model, mask, **got.compact_kwargs())
    with torch.no_grad():
        assert _rel(small(ids).logits, work(ids).logits) < 1e-10


def test_residual_targets_pull_the_stream_back_to_the_dense_models():
    """On the calibration windows the residual-target refit leaves the last layer's output closer to
    the dense model's than the output-target refit, which only reproduces each block's output."""
    model = tiny_model("llama", seed=3, dtype=torch.float64)
    space = MaskSpace.from_model(model)
    mask = _mask(space, 3)
    calib = _calib(model, n=12, seed=3)
    with torch.no_grad():
        dense = model(calib, output_hidden_states=True).hidden_states[-1]
        drift = {}
        for residual in (True, False):
            fit = reconstruct(model, mask, calib, damping=0.01, residual=residual)
            small = compact_model(model, mask, **fit.compact_kwargs())
            drift[residual] = _rel(small(calib, output_hidden_states=True).hidden_states[-1], dense)
    assert drift[True] < drift[False], drift


def test_gemma3_refits_block_outputs_and_refuses_residual_targets():
    """Gemma 3 normalises each block's output before the residual add, so the default refit there
    reproduces the projections' outputs (the direct solve of output targets) and asking for
    residual targets is a one-line error."""
    from tests.tiny import tiny_gemma3

    model = tiny_gemma3(seed=6, dtype=torch.float64)
    space = MaskSpace.from_model(model)
    mask = _mask(space, 6)
    calib = _calib(model, seed=6)
    got = reconstruct(model, mask, calib, damping=0.01)
    assert not got.residual
    _, want = _reference(model, mask, calib, 0.01)
    for i in range(space.n_layers):
        assert _rel(got.down_proj_weight[i], want[i, "down_proj"][0]) < 1e-8, i
        assert _rel(got.o_proj_bias[i], want[i, "o_proj"][1]) < 1e-8, i
    with pytest.raises(BppError, match="residual=False") as err:
        reconstruct(model, mask, calib, residual=True)
    assert "\n" not in str(err.value)


def test_layer_two_is_fit_on_the_pruned_layer_ones_outputs():
    """Solved on the dense model's inputs instead, layer 1's weights come out different, so the
    equality above really checks that layer 1 sees the pruned (and refit) layer 0."""
    model = tiny_model("llama", seed=5, dtype=torch.float64)
    space = MaskSpace.from_model(model)
    mask = _mask(space, 5)
    calib = _calib(model, seed=5)
    got = reconstruct(model, mask, calib, damping=0.01, residual=False)
    _, pruned_inputs = _reference(model, mask, calib, 0.01)
    _, dense_inputs = _reference(model, mask, calib, 0.01, dense_inputs=True)
    # layer 0's attention reads the same kept heads either way
    assert _rel(got.o_proj_weight[0], dense_inputs[0, "o_proj"][0]) < 1e-8
    for name, weights in (("o_proj", got.o_proj_weight), ("down_proj", got.down_proj_weight)):
        assert _rel(weights[1], pruned_inputs[1, name][0]) < 1e-8
        assert _rel(weights[1], dense_inputs[1, name][0]) > 1e-3, name


@pytest.mark.parametrize("family", FAMILIES)
def test_large_damping_gives_flaps_bias_and_the_refit_is_closer_to_the_dense_model(family):
    from bpp.methods.flap import compensation_for

    seed = seed_for_test() % 10_000
    model = tiny_model(family, seed=seed)
    space = MaskSpace.from_model(model)
    mask = _mask(space, seed)
    calib = _calib(model, 8, 31, seed)
    flap = compensation_for(model, mask, calib)
    stiff = reconstruct(model, mask, calib, damping=1e9)
    # layer 0's o_proj inputs are the dense ones: W stays W₀ and the intercept is FLAP's bias exactly
    cols = mask.groups[0, 0].repeat_interleave(space.heads_per_group * space.head_dim)
    w_o = model.model.layers[0].self_attn.o_proj.weight[:, cols]
    assert _rel(stiff.o_proj_weight[0], w_o) < 1e-6
    assert _rel(stiff.o_proj_bias[0], flap["o_proj_bias"][0]) < 1e-4
    # with the default damping the refit model is closer to the dense one on the calibration windows
    refit = compact_model(model, mask, **reconstruct(model, mask, calib).compact_kwargs())
    biased = compact_model(model, mask, **flap)
    with torch.no_grad():
        dense = model(calib).logits
        assert _rel(refit(calib).logits, dense) < _rel(biased(calib).logits, dense)


@pytest.mark.parametrize("family", FAMILIES)
def test_reconstructed_folder_loads_with_plain_transformers(tmp_path, tokenizer, family):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, seed=2)
    space = MaskSpace.from_model(model)
    mask = _mask(space, 2)
    mask.layers[0, 1] = family == "qwen3"  # a dropped layer is left alone
    if family == "qwen2":
        mask.channels[0, 0, :] = True  # nothing pruned in an MLP: left alone
    recon = reconstruct(model, mask, _calib(model))
    if family == "qwen2":
        assert recon.down_proj_weight[0] is None and float(recon.down_proj_bias[0].abs().max()) == 0.0
    if family != "qwen3":
        assert recon.o_proj_weight[1] is None and recon.down_proj_weight[1] is None
    small = compact_model(model, mask, **recon.compact_kwargs())
    save_compacted(model, mask, tmp_path / "small", tokenizer=tokenizer, compacted=small, **recon.compact_kwargs())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "small", trust_remote_code=True).eval()
    ids = _calib(model, 2, 19, 7)
    with torch.no_grad():
        assert _rel(loaded(ids).logits, small(ids).logits) < 1e-6
    record = json.loads((tmp_path / "small" / "bpp_compaction.json").read_text())
    assert record["reconstructed"] and not record["bias_compensation"]


def test_an_emptied_block_keeps_the_dense_mean_output():
    model = tiny_model("llama", seed=4)
    space = MaskSpace.from_model(model)
    mask = _mask(space, 4)
    mask.groups[0, 1] = False
    calib = _calib(model)
    recon = reconstruct(model, mask, calib)
    assert tuple(recon.o_proj_weight[1].shape) == (space.hidden_size, 0)
    outs = []
    handle = model.model.layers[1].self_attn.o_proj.register_forward_hook(lambda m, a, o: outs.append(o))
    with torch.no_grad():
        model(calib)
    handle.remove()
    assert _rel(recon.o_proj_bias[1], outs[0].reshape(-1, space.hidden_size).mean(0)) < 1e-5
    small = compact_model(model, mask, **recon.compact_kwargs())
    assert small.config.kv_heads_per_layer[1] == 0


def test_bad_inputs_give_one_line_errors():
    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    mask = _mask(space, 0)
    calib = _calib(model)
    with pytest.raises(BppError, match="one mask"):
        reconstruct(model, Masks.cat([mask, mask]), calib)
    with pytest.raises(BppError, match="integer tensor"):
        reconstruct(model, mask, calib.float())
    with pytest.raises(BppError, match=r"\[0, 301\)"):
        reconstruct(model, mask, calib + 400)
    with pytest.raises(BppError, match="damping"):
        reconstruct(model, mask, calib, damping=-1.0)
    with pytest.raises(BppError, match="residual must be True, False or None"):
        reconstruct(model, mask, calib, residual="yes")
    with pytest.raises(BppError, match="shape"):
        reconstruct(model, Masks(mask.channels[:, :, :5], mask.groups, mask.layers), calib)
    recon = reconstruct(model, mask, calib)
    bad = recon.compact_kwargs()
    bad["down_proj_weight"] = [w[:, :-1] for w in bad["down_proj_weight"]]
    with pytest.raises(BppError, match=r"down_proj_weight\[0\] has shape"):
        compact_model(model, mask, **bad)
    with pytest.raises(BppError, match="one entry per layer"):
        compact_model(model, mask, o_proj_weight=recon.o_proj_weight[:1])


def test_compact_and_baseline_reconstruct(tmp_path, tokenizer):
    import bpp
    from typer.testing import CliRunner

    from bpp.cli import app

    model = tiny_model("qwen2", seed=1)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    mask = _mask(MaskSpace.from_model(model), 1)
    mask.save(tmp_path / "mask.safetensors")
    args = ["compact", "--model", str(tmp_path / "m"), "--mask", str(tmp_path / "mask.safetensors"),
            "--out", str(tmp_path / "small"), "--calib-windows", "3", "--calib-seq-len", "16"]
    result = CliRunner().invoke(app, args + ["--reconstruct"])
    assert result.exit_code == 0, result.output
    assert "reconstructed" in result.output
    record = json.loads((tmp_path / "small" / "bpp_compaction.json").read_text())
    assert record["reconstructed"] and record["calibration"] == {"data": "default", "windows": 3, "seq_len": 16}
    for extra, message in ((["--bias-compensation"], "drop --bias-compensation"), (["--slnp"], "--clap or --slnp"),
                           (["--damping", "-1"], "--damping"), (["--calib-seq-len", "1"], "--calib-seq-len")):
        bad = CliRunner().invoke(app, args + ["--force", "--reconstruct"] + extra)
        assert bad.exit_code != 0 and isinstance(bad.exception, BppError), extra
        assert message in str(bad.exception) and "\n" not in str(bad.exception)
    # the API: the same model in memory
    small = bpp.compact(model, tmp_path / "mask.safetensors", reconstruct=True, calib_windows=3, calib_seq_len=16,
                        tokenizer=tokenizer)
    assert small.bpp_compaction["reconstructed"] and not small.bpp_compaction["bias_compensation"]

    out = tmp_path / "base"
    result = CliRunner().invoke(app, ["baseline", "--method", "magnitude", "--model", str(tmp_path / "m"),
                                      "--sparsity", "0.3", "--out", str(out), "--calib-windows", "3",
                                      "--calib-seq-len", "16", "--eval-windows", "2", "--compensation", "reconstruct"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["compensation"] == "reconstruct"
    assert json.loads((out / "model" / "bpp_compaction.json").read_text())["reconstructed"]
    # a mask in a baseline's folder is calibrated on that run's data
    from bpp.jobs.compact import run_data

    assert run_data(out / "mask.safetensors") == "default"
    bad = CliRunner().invoke(app, ["baseline", "--method", "magnitude", "--model", str(tmp_path / "m"),
                                   "--out", str(tmp_path / "b2"), "--compensation", "lstsq"])
    assert bad.exit_code != 0 and "unknown compensation 'lstsq'" in str(bad.exception)


def test_choose_damping_picks_the_least_held_back_error():
    from bpp.reconstruction import NormalEquations, choose_damping

    g = torch.Generator().manual_seed(0)
    k, d = 12, 5
    w_true = torch.randn(d, k, generator=g, dtype=torch.float64)
    w0 = w_true + 0.3 * torch.randn(d, k, generator=g, dtype=torch.float64)

    def equations(n, noise):
        eq = NormalEquations(k, d)
        x = torch.randn(n, k, generator=g, dtype=torch.float64)
        eq.add(x, x @ w_true.T + noise * torch.randn(n, d, generator=g, dtype=torch.float64))
        return eq

    # plenty of clean tokens: the fit should trust the data, the least damping wins
    lam, held = choose_damping(equations(400, 0.01), equations(400, 0.01), w0)
    assert lam == 0.01 and held[0.01] < held[10.0]
    # fewer tokens than inputs and noisy targets: the refit overfits, strong damping wins
    lam, held = choose_damping(equations(8, 3.0), equations(400, 3.0), w0)
    assert lam >= 1.0 and held[lam] == min(held.values())


def test_auto_damping_refits_every_projection_and_records_its_choice():
    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    mask = _mask(space, 0)
    calib = _calib(model, n=8, T=23)
    recon = reconstruct(model, mask, calib, damping="auto", batch_size=2)
    assert recon.damping == "auto"
    for record in recon.errors:
        for name in ("o_proj", "down_proj"):
            chosen = record[name]["damping"]
            held = record[name]["held_back_errors"]
            assert held[str(chosen)] == min(held.values()) and record[name]["refit"] <= record[name]["bias"] + 1e-9
    # the default batches (8 windows) shrink to two batches of 4: the same split as batch_size=4
    by_default = reconstruct(model, mask, calib)
    assert by_default.damping == "auto"
    assert all(torch.equal(a, b) for a, b in zip(by_default.down_proj_bias,
                                                  reconstruct(model, mask, calib, batch_size=4).down_proj_bias))
    with pytest.raises(BppError, match="at least 2"):
        reconstruct(model, mask, calib[:1])
    with pytest.raises(BppError, match="damping must be 'auto' or"):
        reconstruct(model, mask, calib, damping="strong")
