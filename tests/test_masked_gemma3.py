"""The batched masked forward on Gemma 3 against the hook ground truth: GELU-tanh gated MLP,
RMSNorms scaled by 1 + w before and after attention and MLP, q/k norms, scaled embeddings, and
sliding-window layers with their own RoPE base, including windows shorter than the sequence."""
import pytest
import torch

from bpp import MaskedModel, Masks, MaskSpace
from bpp.models.hooks import hook_losses
from tests.tiny import tiny_gemma3


def _masks(space, S, seed):
    masks = Masks.sample(Masks.probabilities(space, 0.6), S, torch.Generator().manual_seed(seed))
    masks.channels[0], masks.groups[0] = True, True  # the dense model
    masks.layers[1, 2] = False  # a dropped full-attention layer
    return masks


@pytest.mark.parametrize("T", [7, 21], ids=["shorter than the window", "longer than the window"])
def test_gemma3_losses_equal_the_hook_masked_hf_model(T):
    model = tiny_gemma3(sliding_window=8)
    space = MaskSpace.from_model(model)
    masks = _masks(space, 6, seed=T)
    ids = torch.randint(0, model.config.vocab_size, (2, T))
    got = MaskedModel(model).losses(ids, masks)
    want = hook_losses(model, ids, masks)
    rel = ((got - want).abs() / want.abs()).max().item()
    assert rel <= 1e-4, f"max relative error {rel:.2e}"
    assert want.unique().numel() == 6  # the masks change the loss


def test_gemma3_window_matters_beyond_its_length():
    """The same weights with a window longer than the text give other losses: the window is applied."""
    ids = torch.randint(0, 300, (1, 21))
    narrow, wide = tiny_gemma3(sliding_window=4), tiny_gemma3(sliding_window=64)
    masks = Masks.full(MaskSpace.from_model(narrow), 1)
    a, b = MaskedModel(narrow).losses(ids, masks), MaskedModel(wide).losses(ids, masks)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, hook_losses(wide, ids, masks), rtol=1e-4, atol=0)


def test_gemma3_in_bf16_follows_float32():
    model = tiny_gemma3()
    space = MaskSpace.from_model(model)
    masks = _masks(space, 4, seed=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    want = MaskedModel(model).losses(ids, masks)
    got = MaskedModel(model, dtype=torch.bfloat16).losses(ids, masks)
    assert ((got - want).abs() / want).max() <= 2e-2


def test_gemma3_270m_window_of_512_on_a_text_longer_than_it():
    """Gemma 3 270M's window (512 tokens) on 600 tokens: the batched forward follows the hook-masked
    model, and the window changes the losses (the same weights with a window of 1,024 differ)."""
    long = dict(sliding_window=512, max_position_embeddings=1024)
    model, wide = tiny_gemma3(**long), tiny_gemma3(**dict(long, sliding_window=1024))
    space = MaskSpace.from_model(model)
    masks = _masks(space, 3, seed=5)
    ids = torch.randint(0, model.config.vocab_size, (1, 600), generator=torch.Generator().manual_seed(5))
    got = MaskedModel(model).losses(ids, masks)
    want = hook_losses(model, ids, masks)
    assert ((got - want).abs() / want.abs()).max().item() <= 1e-4
    assert not torch.allclose(got, MaskedModel(wide).losses(ids, masks), rtol=1e-4, atol=0)
