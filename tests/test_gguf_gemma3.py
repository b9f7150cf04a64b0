"""GGUF export of Gemma 3 (llama.cpp's ``gemma3`` architecture): the file, loaded in llama.cpp
itself (llama-cpp-python, CPU), gives the greedy tokens of transformers' ``generate()`` on the
same model, and logits close to it; folders llama.cpp's gemma3 graph cannot run are refused in
one line before anything is written.

The tiny Gemma 3 here has a sliding window (8) far shorter than prompt + generation (23 + 32),
full-attention layers where llama.cpp's default pattern has none (so the per-layer pattern must
travel), a query scale that is not 1/sqrt(head_dim) and rope bases that are not llama.cpp's
defaults (so a key it ignored would change the logits).

Tolerance (f32 files): llama.cpp's CPU GELU reads a table of float16 values, so its logit error
against the model in float64 is held to at most twice that of the same torch model whose GELU is
rounded the same way (input and output through float16), computed in float32."""
import copy

import gguf
import llama_cpp
import numpy as np
import pytest
import torch

from bpp import Masks, MaskSpace, export_gguf, load_model
from bpp.compaction import save_compacted
from bpp.errors import BppError
from tests.test_export import (GREEDY_STEPS, PROMPT_LEN, _arch, _field, _gguf_greedy, _gguf_logits, _llama,
                               _no_output, _rel, _save_dense, _sentencepiece_style_tokenizer, _torch_logits)
from tests.tiny import tiny_gemma3, tiny_tokenizer

N_LAYERS = 5
SHAPE = dict(num_hidden_layers=N_LAYERS, query_pre_attn_scalar=24, intermediate_size=96,
             layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                          "full_attention"],
             rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
N_PROMPTS = 3


def _gemma(**overrides):
    return tiny_gemma3(seed=3, **dict(SHAPE, **overrides))


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (PROMPT_LEN,), generator=g).tolist() for _ in range(N_PROMPTS)]


@torch.no_grad()
def _generate(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy ``generate()`` with its KV cache, EOS not special (llama.cpp's loop
    here does not stop at it either)."""
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, use_cache=True,
                         pad_token_id=0)
    return out[0, len(ids):].tolist()


class _Float16Gelu(torch.nn.Module):
    """tanh-GELU as llama.cpp's CPU backend computes it: looked up in a float16 table."""

    def forward(self, x):
        x16 = x.to(torch.float16).to(x.dtype)
        return torch.nn.functional.gelu(x16, approximate="tanh").to(torch.float16).to(x.dtype)


def _with_float16_gelu(model):
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        if hasattr(layer.mlp, "act_fn"):
            layer.mlp.act_fn = _Float16Gelu()
    return model


def _check(path, model, label: str) -> None:
    """llama.cpp's f32 logits within twice the float16-GELU torch model's error (see the module
    docstring), then the greedy tokens of ``generate()`` on every prompt."""
    llm = _llama(path)
    prompts = _prompts(model.config.vocab_size)
    ids = prompts[0]
    exact = _torch_logits(copy.deepcopy(model).double(), ids)
    err, own = _rel(_gguf_logits(llm, ids), exact), _rel(_torch_logits(_with_float16_gelu(model), ids), exact)
    print(f"{label}: relative logit error vs float64: llama.cpp {err:.2e}, torch float32 with float16 GELU {own:.2e}")
    assert err <= 2 * own, f"{label}: llama.cpp's relative logit error {err:.2e} > 2 x torch's {own:.2e}"
    for ids in prompts:
        assert _gguf_greedy(llm, ids, GREEDY_STEPS) == _generate(model, ids, GREEDY_STEPS), (label, ids)
    llm.close()


def _uniform_mask(space: MaskSpace) -> Masks:
    """The same sizes in every kept layer: one KV group of two and 64 of 96 channels; layer 2
    dropped (the file's sliding pattern is then [s, f, s, f])."""
    g = torch.Generator().manual_seed(2)
    mask = Masks.full(space, 1)
    for i in range(space.n_layers):
        mask.channels[0, i, torch.randperm(space.n_channels, generator=g)[:space.n_channels - 64]] = False
        mask.groups[0, i, i % 2] = False
    mask.layers[0, 2] = False
    return mask


def _ragged_mask(space: MaskSpace, kind: str) -> Masks:
    mask = Masks.full(space, 1)
    if kind == "channels":
        mask.channels[0, 1, :30] = False
    elif kind == "groups":
        mask.groups[0, 3, 0] = False
    else:  # "no-attention": layer 1's attention emptied
        mask.groups[0, 1] = False
    return mask


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


# ----------------------------------------------------------------------------- what exports

def test_dense_gemma3_exports_as_gemma3_and_matches_transformers(tmp_path, tokenizer):
    model = _gemma()
    path = export_gguf(_save_dense(model, tokenizer, tmp_path / "m"), tmp_path / "m.gguf", progress=False)
    assert _arch(path) == "gemma3"
    assert _field(path, "gemma3.attention.sliding_window") == 8
    assert _field(path, "gemma3.rope.freq_base") == 10000.0 and _field(path, "gemma3.rope.freq_base_swa") == 100.0
    assert _field(path, "gemma3.attention.sliding_window_pattern") == [True, False, True, True, False]
    # Gemma's norms scale by (1 + w): the file holds 1 + w
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp uses token_embd
    np.testing.assert_allclose(np.asarray(tensors["blk.0.post_ffw_norm.weight"].data),
                               1 + model.model.layers[0].post_feedforward_layernorm.weight.detach().numpy(), rtol=1e-6)
    _check(path, model, "dense gemma3")


def test_the_default_pattern_and_query_scale_write_no_extra_key(tmp_path, tokenizer):
    """Layers that slide as llama.cpp assumes (every 6th full) and query_pre_attn_scalar = head_dim:
    the file has the keys of a stock gemma3 file, and still computes the model."""
    model = _gemma(num_hidden_layers=7, query_pre_attn_scalar=16, layer_types=None)
    assert model.config.layer_types[5] == "full_attention"
    path = export_gguf(_save_dense(model, tokenizer, tmp_path / "m"), tmp_path / "m.gguf", progress=False)
    assert _field(path, "gemma3.attention.sliding_window_pattern") is None
    q_norm = {t.name: t for t in gguf.GGUFReader(path).tensors}["blk.0.attn_q_norm.weight"]
    np.testing.assert_allclose(np.asarray(q_norm.data), 1 + model.model.layers[0].self_attn.q_norm.weight.detach().numpy(),
                               rtol=1e-6)
    _check(path, model, "dense gemma3, default pattern")


def test_a_model_without_sliding_layers(tmp_path, tokenizer):
    """llama.cpp's gemma3 aborts on a file where no layer slides: every layer slides in a window as
    long as the context instead, at the full layers' rope base, which is full attention."""
    model = _gemma(layer_types=["full_attention"] * N_LAYERS)
    path = export_gguf(_save_dense(model, tokenizer, tmp_path / "m"), tmp_path / "m.gguf", progress=False)
    assert _field(path, "gemma3.attention.sliding_window") == _field(path, "gemma3.context_length") == 256
    assert _field(path, "gemma3.attention.sliding_window_pattern") is None  # 5 sliding layers: llama.cpp's default
    assert _field(path, "gemma3.rope.freq_base_swa") == 10000.0
    _check(path, model, "dense gemma3 without sliding layers")


def test_uniform_compaction_exports_as_gemma3_and_matches_transformers(tmp_path, tokenizer):
    model = _gemma()
    space = MaskSpace.from_model(model)
    folder = save_compacted(model, _uniform_mask(space), tmp_path / "c", tokenizer=tokenizer)
    compacted, _ = load_model(folder)
    path = export_gguf(folder, tmp_path / "c.gguf", progress=False)
    assert _arch(path) == "gemma3" and _field(path, "gemma3.block_count") == N_LAYERS - 1
    assert _field(path, "gemma3.feed_forward_length") == 64 and _field(path, "gemma3.attention.head_count_kv") == 1
    assert _field(path, "gemma3.attention.sliding_window_pattern") == [True, False, True, False]
    _check(path, compacted, "uniformly compacted gemma3")


def _file_precision(model, dtype: str):
    """``model`` computing as llama.cpp's CPU backend does on a ``dtype`` file: every matrix
    rounded as the file holds it, every linear layer's input rounded to the same type first (ggml
    converts the activations to the weights' type, q8_0 blocks included), GELU through float16.
    (On the tiny model's q8_0 file llama.cpp's logits are 2e-2 from the model with rounded weights
    alone, 1e-3 from this one.)"""
    from gguf.quants import dequantize, quantize

    q = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
         "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]

    def rounded(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(dequantize(quantize(x.detach().numpy(), q), q).copy()).reshape(x.shape)

    model = _with_float16_gelu(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(rounded(p))
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda m, args: (rounded(args[0]),))
    return model


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_lower_precision_dtypes(tmp_path, tokenizer, dtype):
    """f16 / bf16 / q8_0 files of the compacted model: llama.cpp's greedy tokens are those of the
    torch model rounded as llama.cpp computes (:func:`_file_precision`), and its logits are no
    further from that model's than the dense file's are from the dense model's, twice over.
    Widths are multiples of 32 (hidden 64, 64 channels kept) so q8_0 holds every matrix."""
    model = _gemma()
    space = MaskSpace.from_model(model)
    folder = save_compacted(model, _uniform_mask(space), tmp_path / "c", tokenizer=tokenizer)
    compacted, _ = load_model(folder)
    path = export_gguf(folder, tmp_path / "c.gguf", dtype=dtype, progress=False)
    dense = export_gguf(_save_dense(model, tokenizer, tmp_path / "d"), tmp_path / "d.gguf", dtype=dtype,
                        progress=False)
    assert _field(path, "general.file_type") == {"f16": 1, "bf16": 32, "q8_0": 7}[dtype]
    ids = _prompts(model.config.vocab_size)[0]
    rounded, dense_rounded = _file_precision(compacted, dtype), _file_precision(model, dtype)
    llm = _llama(path)
    err = _rel(_gguf_logits(llm, ids), _torch_logits(rounded, ids))
    dense_err = _rel(_gguf_logits(_llama(dense), ids), _torch_logits(dense_rounded, ids))
    print(f"{dtype}: relative logit error vs the rounded torch model: pruned {err:.2e}, dense {dense_err:.2e}")
    assert 0 < err <= 2 * dense_err
    for ids in _prompts(model.config.vocab_size):
        assert _gguf_greedy(llm, ids, GREEDY_STEPS) == _generate(rounded, ids, GREEDY_STEPS), (dtype, ids)
    llm.close()


def test_gemma_style_tokenizer_matches_transformers(tmp_path):
    """Gemma's tokenizer.json (SentencePiece converted to BPE: spaces become '▁' without one
    prepended, a split on spaces that then splits nothing, byte fallback, <bos> added): llama.cpp's
    SentencePiece tokenizer splits a text as transformers does."""
    tok = _sentencepiece_style_tokenizer(gemma=True)
    model = _gemma(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
    path = export_gguf(_save_dense(model, tok, tmp_path / "m"), tmp_path / "m.gguf", progress=False)
    assert _field(path, "tokenizer.ggml.model") == "llama"
    assert _field(path, "tokenizer.ggml.add_space_prefix") is False
    assert _field(path, "tokenizer.ggml.add_bos_token") is True
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    import pydoc_data.topics

    for text in (list(pydoc_data.topics.topics.values())[70][:1500], "Grüße 🦙 and  two  spaces\nnew line",
                 " leading space"):
        want = tok(text)["input_ids"]
        assert want[0] == tok.bos_token_id and tok.unk_token_id not in want
        assert llm.tokenize(text.encode(), add_bos=True) == want, text
    llm.close()


def _embedded_270m():
    from bpp.embedded import GEMMA3_MODEL, cache_dir

    return cache_dir() / GEMMA3_MODEL


@pytest.mark.slow
@pytest.mark.skipif(not (_embedded_270m() / "model.safetensors").is_file(),
                    reason="the embedded Gemma 3 270M is not converted in $BPP_CACHE (any bpp command with "
                           "--model gemma3-270m converts it from its packages)")
def test_embedded_gemma3_270m(tmp_path):
    """The real model: its 262k-token tokenizer as transformers', 16 greedy tokens as generate()'s."""
    model, tok = load_model(str(_embedded_270m()))
    path = export_gguf(_embedded_270m(), tmp_path / "m.gguf", progress=False)
    llm = _llama(path)
    import pydoc_data.topics

    text = list(pydoc_data.topics.topics.values())[3][:300]
    ids = tok(text)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=True) == ids
    assert _gguf_greedy(llm, ids, 16) == _generate(model, ids, 16)
    llm.close()


# ----------------------------------------------------------------------------- what is refused

@pytest.mark.parametrize("kind", ["channels", "groups", "no-attention"])
def test_per_layer_sizes_are_refused_in_one_line(tmp_path, tokenizer, kind):
    model = _gemma()
    folder = save_compacted(model, _ragged_mask(MaskSpace.from_model(model), kind), tmp_path / "c",
                            tokenizer=tokenizer)
    with pytest.raises(BppError, match="Gemma 3 model with per-layer sizes has no GGUF form") as e:
        export_gguf(folder, tmp_path / "out.gguf")
    assert "\n" not in str(e.value) and "loads in transformers" in str(e.value)
    _no_output(tmp_path)


def test_compact_with_export_refuses_before_compacting(tmp_path, tokenizer):
    """`bpp compact --export gguf` of a mask llama.cpp's gemma3 cannot run: refused before the
    folder is written, not after."""
    from bpp.jobs.compact import compact

    model = _gemma()
    space = MaskSpace.from_model(model)
    with pytest.raises(BppError, match="--export gguf of .* per-layer sizes has no GGUF form"):
        compact(model, _ragged_mask(space, "channels"), tmp_path / "c", tokenizer=tokenizer, export="gguf")
    with pytest.raises(BppError, match="--export gguf of .* output biases"):
        compact(model, _uniform_mask(space), tmp_path / "c", tokenizer=tokenizer, export="gguf",
                bias_compensation=True)
    assert list(tmp_path.iterdir()) == []
    compact(model, _uniform_mask(space), tmp_path / "c", tokenizer=tokenizer, export="gguf")
    assert _arch(tmp_path / "c.gguf") == "gemma3"


def test_bias_compensation_is_refused_in_one_line(tmp_path, tokenizer):
    model = _gemma()
    space = MaskSpace.from_model(model)
    g = torch.Generator().manual_seed(5)
    biases = {name: [0.1 * torch.randn(space.hidden_size, generator=g) for _ in range(space.n_layers)]
              for name in ("o_proj_bias", "down_proj_bias")}
    folder = save_compacted(model, _uniform_mask(space), tmp_path / "c", tokenizer=tokenizer, **biases)
    with pytest.raises(BppError, match="Gemma 3 model with output biases .* has no GGUF form") as e:
        export_gguf(folder, tmp_path / "out.gguf")
    assert "\n" not in str(e.value) and "--compensation none" in str(e.value)
    _no_output(tmp_path)


@pytest.mark.parametrize("key, value, message", [
    ("final_logit_softcapping", 30.0, "final_logit_softcapping is set"),
    ("hidden_activation", "gelu", "is not gelu_pytorch_tanh"),
    ("rope_parameters", {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}, "rope type 'linear'"),
])
def test_configs_llama_cpp_computes_otherwise_are_refused(tmp_path, tokenizer, key, value, message):
    model = _gemma(**{key: value})
    folder = _save_dense(model, tokenizer, tmp_path / "m")
    with pytest.raises(BppError, match=message):
        export_gguf(folder, tmp_path / "out.gguf")
    _no_output(tmp_path)


def test_prune_with_export_refuses_gemma3_before_the_search(tmp_path, tokenizer):
    """`bpp prune --export gguf` on Gemma 3 is refused before anything runs or is written: the
    search learns per-layer sizes and the refit writes output biases, neither of which gemma3 runs."""
    from bpp.jobs.prune import prune
    from bpp.search import PruneConfig

    with pytest.raises(BppError, match="--export gguf: bpp prune learns per-layer sizes") as e:
        prune(PruneConfig(sparsity=0.2, steps=2), tmp_path / "run", model=_gemma(), tokenizer=tokenizer,
              export="gguf", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
