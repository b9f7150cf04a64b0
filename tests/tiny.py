"""Tiny random models of every supported family, built in-process (no hub), and a tiny tokenizer."""
from __future__ import annotations

import functools

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# odd sizes on purpose: hidden 60, 6 query heads in 2 KV groups of 3, head_dim 10, 70 channels
TINY = dict(
    vocab_size=301,
    hidden_size=60,
    intermediate_size=70,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=10,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    kwargs = dict(TINY, **overrides)
    if family == "mistral":
        kwargs.setdefault("sliding_window", None)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    with torch.no_grad():  # larger-than-default random weights so masks change the loss visibly
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:  # biases (Qwen2 q/k/v)
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


@functools.cache
def _trained_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import pydoc_data.topics

    text = list(pydoc_data.topics.topics.values())[:60]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY["vocab_size"],
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text, trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE tokenizer with at most 301 tokens (fits the tiny models' vocab)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
    )
    assert len(tok) <= TINY["vocab_size"]
    return tok


def check_calibrated_init(method: str, family: str, calib: torch.Tensor, sparsity: float = 0.3):
    """Run ``bpp.methods.initialise`` with a calibrated method on a tiny model and assert what every
    such init must give: θ in [0, 1] meeting each part's budget, one init mask, and a clear error
    without calibration data. Returns ``(space, init_mask, metrics)`` for method-specific checks."""
    import pytest

    from bpp.errors import BppError
    from bpp.methods import initialise
    from bpp.budget import Budget
    from bpp.space import MaskSpace

    model = tiny_model(family)
    space = MaskSpace.from_model(model)
    budget = Budget(space, "channel,group", sparsity)
    theta, init_mask, metrics = initialise(budget, method, model, calib)
    assert theta.shape == (budget.n_units,) and theta.min() >= 0 and theta.max() <= 1
    for got, part in zip(budget.sums(theta), budget.parts):
        assert abs(got - part.target) < 1e-6 * part.target
    assert init_mask.S == 1
    with pytest.raises(BppError, match="calibration"):
        initialise(Budget(space, "channel,group", sparsity), method, model, None)
    return space, init_mask, metrics


def seed_for_test(*salt) -> int:
    """A seed fixed by the running test's id (and ``salt``): random inputs differ from test to test
    but a failing test sees the same ones when run again alone."""
    import os
    import zlib

    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    return zlib.crc32("|".join([test, *map(str, salt)]).encode())


# Gemma 3 (model type gemma3_text) has its own helper: the batched engine does not run it yet, so it is
# not among FAMILIES. Sliding window 8 on layers 0 and 2, full attention on layer 1; 4 query heads in
# 2 KV groups of head_dim 16; a tied LM head, as Gemma 3's.
TINY_GEMMA3 = dict(
    vocab_size=301,
    hidden_size=64,
    intermediate_size=72,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=8,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_gemma3_config(**overrides):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**dict(TINY_GEMMA3, **overrides))


def tiny_gemma3(seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny random ``Gemma3ForCausalLM`` (:data:`TINY_GEMMA3`, changed by ``overrides``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_gemma3_config(**overrides), dtype=dtype)
    with torch.no_grad():  # Gemma's norms scale by (1 + w): w around 0
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model.eval()
