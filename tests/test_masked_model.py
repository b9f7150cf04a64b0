"""The batched masked forward against the hook ground truth."""
import os

import pytest
import torch

from bpp import MaskedModel, Masks, MaskSpace
from bpp.errors import BppError
from bpp.models.hooks import hook_losses
from tests.tiny import tiny_model


def _edge_masks(space: MaskSpace, S: int, seed: int) -> Masks:
    """Random masks whose first samples cover the edge cases: all kept, a layer with every
    channel pruned, a layer with every group pruned, a dropped layer, and everything pruned."""
    g = torch.Generator().manual_seed(seed)
    masks = Masks.sample(Masks.probabilities(space, 0.6), S, g)
    cases = [
        lambda m: None,
        lambda m: m.channels[0].__setitem__(0, False),
        lambda m: m.groups[0].__setitem__(1, False),
        lambda m: m.layers[0].__setitem__(0, False),
        lambda m: (m.channels.fill_(False), m.groups.fill_(False)),
    ]
    full = Masks.full(space, 1)
    for s, edit in enumerate(cases[:S]):
        one = Masks(full.channels.clone(), full.groups.clone(), full.layers.clone()) if s == 0 else masks[s]
        edit(one)
        masks.channels[s], masks.groups[s], masks.layers[s] = one.channels[0], one.groups[0], one.layers[0]
    return masks


@pytest.mark.parametrize("S", [1, 8])
@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_losses_equal_the_hook_masked_hf_model(tiny, S, backend, monkeypatch):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors reach Triton only under TRITON_INTERPRET=1")
    monkeypatch.setenv("BPP_KERNELS_BACKEND", backend)
    space = MaskSpace.from_model(tiny)
    masks = _edge_masks(space, S, seed=S)
    ids = torch.randint(0, tiny.config.vocab_size, (2, 63))
    got = MaskedModel(tiny).losses(ids, masks)
    want = hook_losses(tiny, ids, masks)
    assert got.shape == (S,) and got.dtype == torch.float32
    rel = ((got - want).abs() / want.abs()).max().item()
    assert rel <= 1e-4, f"max relative error {rel:.2e}"
    if S == 8:  # the masks really change the loss: an engine ignoring them would fail above
        assert want.unique().numel() >= 6


def test_batch_invariance_is_exact(tiny):
    space = MaskSpace.from_model(tiny)
    masks = _edge_masks(space, 8, seed=3)
    ids = torch.randint(0, tiny.config.vocab_size, (3, 21))
    mm = MaskedModel(tiny)
    together = mm.losses(ids, masks)
    for j in (0, 4, 7):
        assert torch.equal(mm.losses(ids, masks[j]), together[j : j + 1])


def test_chunking_by_max_tokens_gives_the_same_losses(tiny):
    space = MaskSpace.from_model(tiny)
    masks = _edge_masks(space, 7, seed=5)
    ids = torch.randint(0, tiny.config.vocab_size, (2, 16))
    whole = MaskedModel(tiny).losses(ids, masks)
    chunked = MaskedModel(tiny, max_tokens_per_pass=3 * 32).losses(ids, masks)  # passes of 3, 3, 1
    assert torch.equal(whole, chunked)


def test_logits_equal_the_hook_masked_model():
    from bpp.models.hooks import hook_masks

    model = tiny_model("qwen3")
    space = MaskSpace.from_model(model)
    masks = _edge_masks(space, 4, seed=9)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    logits = MaskedModel(model).logits(ids, masks)
    for s in range(4):
        with hook_masks(model, masks[s]), torch.no_grad():
            want = model(ids).logits
        torch.testing.assert_close(logits[s], want, rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_clear_errors():
    model = tiny_model("llama")
    space = MaskSpace.from_model(model)
    mm = MaskedModel(model)
    masks = Masks.full(space, 2)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    other = Masks(masks.channels[:, :, :-1], masks.groups, masks.layers)
    with pytest.raises(BppError, match=r"masks.channels has shape \(2, 2, 69\).*needs \(2, 2, 70\)"):
        mm.losses(ids, other)
    with pytest.raises(BppError, match="must lie in"):
        mm.losses(ids + model.config.vocab_size, masks)
    with pytest.raises(BppError, match="empty batch"):
        mm.losses(ids[:0], masks)
    with pytest.raises(BppError, match="at least 2 tokens"):
        mm.losses(ids[:, :1], masks)
    with pytest.raises(BppError, match=r"shape \(B, T\)"):
        mm.losses(ids[0], masks)
    with pytest.raises(BppError, match="bool tensor"):
        mm.losses(ids, Masks(masks.channels.float(), masks.groups, masks.layers))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU Triton runs need the interpreter")
def test_triton_backend_batch_invariance(monkeypatch):
    monkeypatch.setenv("BPP_KERNELS_BACKEND", "triton")
    model = tiny_model("qwen2")
    masks = _edge_masks(MaskSpace.from_model(model), 8, seed=11)
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    mm = MaskedModel(model)
    together = mm.losses(ids, masks)
    for j in (1, 6):
        assert torch.equal(mm.losses(ids, masks[j]), together[j : j + 1])


def test_device_map_loaded_model(tmp_path, tokenizer):
    """A model loaded with an accelerate device map (one device here) runs through the engine."""
    import bpp

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    mapped, _ = bpp.load_model(tmp_path / "m", device_map={"": "cpu"})
    masks = _edge_masks(MaskSpace.from_model(model), 3, seed=2)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    assert torch.equal(MaskedModel(mapped).losses(ids, masks), MaskedModel(model).losses(ids, masks))


@pytest.mark.gpu
def test_layers_split_over_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    model = tiny_model("llama", num_hidden_layers=4)
    masks = _edge_masks(MaskSpace.from_model(model), 4, seed=4)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    want = MaskedModel(model).losses(ids, masks)
    for i, layer in enumerate(model.model.layers):
        layer.to(f"cuda:{i // 2}")
    model.model.embed_tokens.to("cuda:0"), model.model.norm.to("cuda:1"), model.lm_head.to("cuda:1")
    model.model.rotary_emb.to("cuda:0")
    got = MaskedModel(model).losses(ids.cuda(), masks.to("cuda:0"))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


def test_llama3_rope_scaling_matches_the_hook_model():
    """cos/sin come from the model's own rotary embedding, so Llama-3 frequency scaling holds."""
    scaled = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                  high_freq_factor=4.0, original_max_position_embeddings=16)
    model = tiny_model("llama", rope_parameters=scaled)
    space = MaskSpace.from_model(model)
    masks = _edge_masks(space, 3, seed=7)
    ids = torch.randint(0, model.config.vocab_size, (2, 127))
    got, want = MaskedModel(model).losses(ids, masks), hook_losses(model, ids, masks)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    # the scaling matters at this length: the same weights with plain RoPE give another loss,
    # by far more than the parity tolerance above (random tiny weights: ~3e-3 relative at T=127)
    full = Masks.full(space, 1)
    scaled_loss = MaskedModel(model).losses(ids, full)
    plain_loss = MaskedModel(tiny_model("llama")).losses(ids, full)
    assert ((plain_loss - scaled_loss).abs() / scaled_loss).item() > 1e-3


def test_unsupported_architectures_are_clear_errors():
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(BppError, match="not supported"):
        MaskedModel(gpt2)
    with pytest.raises(BppError, match="o_proj"):  # Llama with attention_bias also biases o_proj
        MaskedModel(tiny_model("llama", attention_bias=True))
    with pytest.raises(BppError, match="max_tokens_per_pass"):
        MaskedModel(tiny_model("llama"), max_tokens_per_pass=0)


@pytest.mark.parametrize("family, overrides", [("mistral", dict(sliding_window=5)),
                                               ("qwen2", dict(use_sliding_window=True, sliding_window=5,
                                                              max_window_layers=1))])
def test_sliding_windows_shorter_than_the_text_equal_the_hook_model(family, overrides):
    model = tiny_model(family, **overrides)
    space = MaskSpace.from_model(model)
    masks = _edge_masks(space, 5, seed=11)
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    got, want = MaskedModel(model).losses(ids, masks), hook_losses(model, ids, masks)
    rel = ((got - want).abs() / want.abs()).max().item()
    assert rel <= 1e-4, f"max relative error {rel:.2e}"
    windows = [layer.window for layer in MaskedModel(model).layers]
    assert windows == ([5] * len(windows) if family == "mistral" else [None] + [5] * (len(windows) - 1))
