"""Masks judged in a narrower dtype than the model (``MaskedModel(dtype=...)``, ``bpp prune
--dtype auto``): the projections in bf16, the residual stream, norms, loss and teacher in the
model's float32; what ``auto`` resolves to; and that the float32 path is unchanged."""
import json

import pytest
import torch

from bpp import MaskedModel, Masks, MaskSpace
from bpp.errors import BppError
from bpp.search import PruneConfig
from bpp.search import config as config_module
from bpp.search.objective import mask_losses
from tests.tiny import tiny_model


def _masks(space, S, seed):
    return Masks.sample(Masks.probabilities(space, 0.6), S, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_losses_follow_float32_and_float32_is_unchanged(family):
    torch.manual_seed(0)
    model = tiny_model(family)
    space = MaskSpace.from_model(model)
    masks = _masks(space, 8, seed=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 31))
    want = MaskedModel(model).losses(ids, masks)
    assert torch.equal(MaskedModel(model, dtype=torch.float32).losses(ids, masks), want)
    engine = MaskedModel(model, dtype=torch.bfloat16)
    assert engine.layers[0].w_gate_up.dtype == torch.bfloat16 and engine.layers[0].mlp_norm.dtype == torch.float32
    got = engine.losses(ids, masks)
    assert got.dtype == torch.float32
    rel = ((got - want).abs() / want.abs()).max().item()
    assert 0 < rel <= 2e-2, f"bf16 vs float32: max relative error {rel:.2e}"


def test_bf16_teacher_is_the_float32_models():
    torch.manual_seed(0)
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    want = MaskedModel(model).teacher(ids)
    got = MaskedModel(model, dtype=torch.bfloat16).teacher(ids)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_soft_losses_in_bf16_rank_separated_masks_as_float32():
    torch.manual_seed(0)
    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    keep = [1.0, 0.9, 0.75, 0.6, 0.45, 0.3]
    g = torch.Generator().manual_seed(2)
    masks = Masks.full(space, len(keep))
    for s, p in enumerate(keep):  # nested: each mask keeps a subset of the one before
        masks.channels[s] = torch.rand(space.n_layers, space.n_channels, generator=g) < p if s else True
    masks.channels = torch.stack([masks.channels[: s + 1].all(0) for s in range(len(keep))])
    ids = torch.randint(0, model.config.vocab_size, (2, 31))
    e32, e16 = MaskedModel(model), MaskedModel(model, dtype=torch.bfloat16)
    teacher = e32.teacher(ids)
    l32, l16 = e32.losses(ids, masks, teacher=teacher), e16.losses(ids, masks, teacher=teacher)
    assert torch.equal(torch.argsort(l32), torch.argsort(l16)), (l32, l16)


def test_auto_resolves_to_bf16_only_for_a_float32_model_on_a_device_that_has_it(monkeypatch):
    f32, bf16 = torch.float32, torch.bfloat16
    monkeypatch.setattr(config_module, "native_half_dtype", lambda device: bf16)
    auto = PruneConfig().validate()
    assert auto.dtype == "auto" and config_module.model_dtype(auto) == "float32"
    assert config_module.eval_dtype(auto, f32) == bf16
    assert config_module.eval_dtype(auto, torch.float16) == torch.float16  # a model loaded narrow stays as it is
    assert config_module.eval_dtype(PruneConfig(dtype="float32").validate(), f32) == f32
    assert config_module.eval_dtype(PruneConfig(engine="hooks", objective="nll").validate(), f32) == f32
    monkeypatch.setattr(config_module, "native_half_dtype", lambda device: None)
    assert config_module.eval_dtype(auto, f32) == f32


def test_native_half_dtype_reads_the_cpu():
    from bpp.modelio import native_half_dtype

    caps = torch._C._cpu._get_cpu_capability()
    want = torch.bfloat16 if caps.get("avx512_bf16") or caps.get("amx_bf16") else None
    assert native_half_dtype("cpu") == want
    assert native_half_dtype(torch.device("meta")) is None


def test_an_unknown_dtype_is_one_line():
    with pytest.raises(BppError, match="unknown dtype 'int8'"):
        PruneConfig(dtype="int8").validate()


def test_mask_losses_names_the_engine_dtype(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(config_module, "native_half_dtype", lambda device: torch.bfloat16)
    losses, name = mask_losses(model, PruneConfig().validate())
    assert losses.engine.dtype == torch.bfloat16 and name == "MaskedModel in bfloat16"
    losses, name = mask_losses(model, PruneConfig(dtype="float32").validate())
    assert losses.engine.dtype == torch.float32 and name == "MaskedModel"
