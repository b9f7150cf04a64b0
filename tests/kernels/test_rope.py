"""rope_tables: the cos/sin tables Hugging Face's rotary embedding computes (default RoPE),
for positions from 0 or any positions, in the dtype asked; bad arguments refused."""
import pytest
import torch

from bpp_kernels import masked_attention, rope_tables
from tests.kernels import cases


def test_matches_transformers_rotary_embedding():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=50000.0, max_position_embeddings=64)
    emb = LlamaRotaryEmbedding(cfg)
    positions = torch.tensor([[3, 4, 5, 9, 40]])
    cos_hf, sin_hf = emb(torch.zeros(1, 5, 16), positions)
    cos, sin = rope_tables(positions[0], 16, base=50000.0)
    torch.testing.assert_close(cos, cos_hf[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_hf[0], rtol=0, atol=1e-6)
    cos0, _ = rope_tables(5, 16, base=50000.0)
    assert torch.equal(cos0, rope_tables(torch.arange(5), 16, base=50000.0)[0])
    assert torch.allclose(cos0, cases.rope(5, 16, base=50000.0)[0])


def test_dtype_scaling_and_use_in_attention():
    cos64, sin64 = rope_tables(7, 8, dtype=torch.float64)
    assert cos64.dtype == torch.float64 and torch.allclose(cos64 ** 2 + sin64 ** 2, torch.ones_like(cos64))
    half, _ = rope_tables(torch.arange(0, 14, 2), 8, scaling=2.0)
    assert torch.allclose(half, cos64.float())  # positions 0, 2, ... at scaling 2 are positions 0, 1, ...
    kw = cases.attention_inputs(2, 1, 7, 16, 2, 2, 8, 0.5, seed=1)
    kw["cos"], kw["sin"] = rope_tables(7, 8)
    assert masked_attention(**kw, backend="reference").shape == (2, 1, 7, 16)


@pytest.mark.parametrize("args, message", [
    ((0, 8), "at least one position"),
    ((torch.zeros(2, 3, dtype=torch.long), 8), "1-D integer"),
    ((torch.ones(3), 8), "1-D integer"),
    ((4, 7), "even head_dim"),
])
def test_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        rope_tables(*args)
    with pytest.raises(ValueError, match="base must be > 1"):
        rope_tables(4, 8, base=0.5)
