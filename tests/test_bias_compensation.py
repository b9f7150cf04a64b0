"""Bias compensation inside the batched masked loss (issue 18): the loss of a mask with its
compensation biases equals the loss of the model ``bpp compact --bias-compensation`` writes."""
import pytest
import torch
import torch.nn.functional as F

from bpp.compaction import compact_model as compact
from bpp.bias_compensation import BiasCompensation, InputStats
from bpp.errors import BppError
from bpp.methods.flap import compensation_biases
from bpp.models.masked import MaskedModel
from bpp.masks import Masks
from bpp.space import MaskSpace
from tests.tiny import seed_for_test, tiny_model


def _masks(space, S, seed):
    g = torch.Generator().manual_seed(seed)
    L = space.n_layers
    masks = Masks(torch.rand(S, L, space.n_channels, generator=g) < 0.6,
                  torch.rand(S, L, space.n_groups, generator=g) < 0.6, torch.ones(S, L, dtype=torch.bool))
    masks.groups[0, 0] = False  # an attention block emptied: it outputs its compensation, a constant
    masks.groups[1, 1] = True
    masks.channels[1, 1] = True  # nothing pruned in that layer: zero biases
    if S > 2:
        masks.channels[2, 0, :3] = True
    return masks


def _loss(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_masked_loss_with_biases_equals_the_compacted_model(family):
    seed = seed_for_test() % 10_000
    print("seed", seed)
    model = tiny_model(family, seed=seed)
    space = MaskSpace.from_model(model)
    g = torch.Generator().manual_seed(seed)
    calib = torch.randint(0, model.config.vocab_size, (4, 17), generator=g)
    ids = torch.randint(0, model.config.vocab_size, (3, 19), generator=g)
    stats = InputStats(model).collect(calib)
    comp = BiasCompensation.from_stats(model, stats)
    masks = _masks(space, 5, seed)
    engine = MaskedModel(model)
    got = engine.losses(ids, masks, biases=comp.biases(masks))
    plain = engine.losses(ids, masks)
    moved = []
    for s in range(masks.S):
        attn_bias, mlp_bias = compensation_biases(model, masks[s], stats)
        want = _loss(compact(model, masks[s], o_proj_bias=attn_bias, down_proj_bias=mlp_bias), ids)
        assert abs(float(got[s]) - want) <= 1e-4 * abs(want), (s, float(got[s]), want)
        moved.append(abs(float(plain[s]) - want) / abs(want))
    assert max(moved) > 1e-3, moved  # the biases matter, so the equality above is not the plain loss's
    # the layer with nothing pruned gets exactly zero biases
    attn, mlp = comp.biases(masks)
    assert float(attn[1, 1].abs().max()) == 0.0 and float(mlp[1, 1].abs().max()) == 0.0
    # the batched product equals the formula written per layer: the pruned columns times their means
    per_head = space.heads_per_group * space.head_dim
    for i, layer in enumerate(model.model.layers):
        cols = ~masks.groups[3, i].repeat_interleave(per_head)
        w_o = layer.self_attn.o_proj.weight.detach().double()
        w_down = layer.mlp.down_proj.weight.detach().double()
        ref_attn = w_o[:, cols] @ stats.mean("attn")[i][cols]
        ref_mlp = w_down[:, ~masks.channels[3, i]] @ stats.mean("mlp")[i][~masks.channels[3, i]]
        assert torch.allclose(attn[i, 3].double(), ref_attn, rtol=1e-6, atol=1e-7)
        assert torch.allclose(mlp[i, 3].double(), ref_mlp, rtol=1e-6, atol=1e-7)


def test_per_window_losses_average_to_the_batch_loss_and_are_batch_invariant():
    model = tiny_model("llama", seed=3)
    space = MaskSpace.from_model(model)
    ids = torch.randint(0, model.config.vocab_size, (4, 13), generator=torch.Generator().manual_seed(1))
    masks = _masks(space, 3, 1)
    engine = MaskedModel(model)
    comp = BiasCompensation.collect(model, ids[:2])
    biases = comp.biases(masks)
    per = engine.losses(ids, masks, biases=biases, per_window=True)
    assert per.shape == (3, 4)
    assert torch.allclose(per.mean(1), engine.losses(ids, masks, biases=biases), rtol=1e-6)
    alone = engine.losses(ids, masks[2], biases=comp.biases(masks[2]), per_window=True)
    assert torch.equal(alone[0], per[2])  # a mask's losses do not depend on its batch mates


def test_dropped_layers_get_no_bias_and_saved_means_round_trip(tmp_path):
    model = tiny_model("llama", seed=4)
    space = MaskSpace.from_model(model)
    comp = BiasCompensation.collect(model, torch.randint(0, 300, (2, 11)))
    masks = _masks(space, 2, 4)
    masks.layers[0, 1] = False
    attn, mlp = comp.biases(masks)
    assert float(attn[1, 0].abs().max()) == 0.0 and float(mlp[1, 0].abs().max()) == 0.0
    comp.save(tmp_path / "b.safetensors")
    again = BiasCompensation.load(model, tmp_path / "b.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(comp.biases(masks), again.biases(masks)))
    with pytest.raises(BppError, match="not found"):
        BiasCompensation.load(model, tmp_path / "missing.safetensors")
    with pytest.raises(BppError, match="one mean vector per layer"):
        BiasCompensation(model, comp.attn_means[:1], comp.mlp_means)


def test_teacher_loss_is_the_cross_entropy_against_the_dense_distribution():
    model = tiny_model("qwen2", seed=6)
    space = MaskSpace.from_model(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    masks = _masks(space, 3, 6)
    engine = MaskedModel(model)
    comp = BiasCompensation.collect(model, ids)
    got = engine.losses(ids, masks, biases=comp.biases(masks), teacher=engine.teacher(ids), per_window=True)
    with torch.no_grad():
        p_dense = torch.softmax(model(ids).logits[:, :-1].double(), -1)
        for s in range(masks.S):
            attn_bias, mlp_bias = compensation_biases(model, masks[s], InputStats(model).collect(ids))
            logq = torch.log_softmax(compact(model, masks[s], o_proj_bias=attn_bias,
                                             down_proj_bias=mlp_bias)(ids).logits[:, :-1].double(), -1)
            want = -(p_dense * logq).sum(-1).mean(-1)  # (B,) soft cross-entropy per window
            assert torch.allclose(got[s].double(), want, rtol=1e-4), (got[s], want)
