"""GGUF export (issue 19): the written file, loaded in llama.cpp itself (llama-cpp-python, CPU,
2 threads), computes what the torch compacted model computes, and the same 32 greedy tokens.

Tolerance (f32 files): against the model run in float64, llama.cpp's logits may be off by at most
twice what torch's own float32 forward of the same model is off (STYLE.md's FlashAttention rule).
The dense model's export is held to the same rule first. The bound is per model because pruning
changes how much float32 rounding the model amplifies: on SmolLM2 at 20% torch's own float32 error
is ~4x the dense model's, so the dense model's error alone would be the wrong yardstick.

llama_cpp is imported unconditionally: CI installs it (scripts/install.sh), so a missing build
fails these tests instead of skipping them."""
import copy
import json

import gguf
import llama_cpp
import numpy as np
import pytest
import torch

from bpp import Masks, MaskSpace, export_gguf
from bpp.compaction import save_compacted
from bpp.errors import BppError
from tests.tiny import tiny_model, tiny_tokenizer

THREADS = 2
GREEDY_STEPS = 32
PROMPT_LEN = 23


def _llama(path, n_ctx: int = 256) -> llama_cpp.Llama:
    # f32 KV cache: llama.cpp's default f16 cache would add its own rounding to the comparison
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=THREADS,
                           n_threads_batch=THREADS, logits_all=True, verbose=False,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def _gguf_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float64))


def _gguf_greedy(llm, ids: list[int], n: int) -> list[int]:
    """Greedy continuation in llama.cpp, one token per decode (its KV-cache path)."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


@torch.no_grad()
def _torch_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].double()


@torch.no_grad()
def _torch_greedy(model, ids: list[int], n: int, cached: bool = False) -> list[int]:
    """Greedy continuation of the torch model (EOS not special): recomputed from scratch at every
    step, or with its KV cache (``cached``: only where layer 0 has attention, since transformers
    reads the position from layer 0's cache)."""
    if not cached:
        seq = list(ids)
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]), logits_to_keep=1).logits[0, -1].argmax()))
        return seq[len(ids):]
    out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(n - 1):
        out = model(torch.tensor([tokens[-1:]]), cache=out.cache, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def _arch(path) -> str:
    return gguf.GGUFReader(path).fields["general.architecture"].contents()


def _field(path, key):
    field = gguf.GGUFReader(path).fields.get(key)
    return None if field is None else field.contents()


def _save_dense(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _folder_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- tiny models

N_LAYERS = 5


def _tiny(family: str, **overrides):
    return tiny_model(family, seed=3, num_hidden_layers=N_LAYERS, **overrides)


def _ragged_mask(space: MaskSpace, kind: str) -> Masks:
    """Per-layer sizes that differ, on a 5-layer tiny model (2 KV groups, 70 channels):
    layer 0 keeps both groups and 41 channels; layer 1 has no attention (n_head = 0 in the file);
    layer 2 is dropped; layer 3 keeps one group and no MLP channel; layer 4 one group, 70
    channels. ``first-empty``: layer 0 has no attention either (a stand-in head in the file)."""
    g = torch.Generator().manual_seed(11)
    mask = Masks.full(space, 1)
    mask.channels[0, 0] = False
    mask.channels[0, 0, torch.randperm(space.n_channels, generator=g)[:41]] = True
    mask.groups[0, 1] = False
    mask.channels[0, 1, torch.randperm(space.n_channels, generator=g)[:23]] = False
    mask.layers[0, 2] = False
    mask.groups[0, 3, 0] = False
    mask.channels[0, 3] = False
    mask.groups[0, 4, 1] = False
    if kind == "first-empty":
        mask.groups[0, 0] = False
    return mask


def _biases(space: MaskSpace, seed: int = 5) -> dict:
    """Random per-layer output biases in the place of a bias compensation (what matters here is
    that every one of them, including those of emptied blocks, reaches the file)."""
    g = torch.Generator().manual_seed(seed)
    return {name: [0.1 * torch.randn(space.hidden_size, generator=g) for _ in range(space.n_layers)]
            for name in ("o_proj_bias", "down_proj_bias")}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _check_f32(path, model, ids: list[int], label: str, greedy: bool = True, cached: bool = False) -> tuple[float, float]:
    """llama.cpp's f32 logits of the file vs ``model`` in float64: at most twice torch's own
    float32 error; then the same greedy tokens. Returns (llama.cpp error, torch float32 error)."""
    llm = _llama(path)
    exact = _torch_logits(copy.deepcopy(model).double(), ids)
    err, own = _rel(_gguf_logits(llm, ids), exact), _rel(_torch_logits(model, ids), exact)
    print(f"{label}: relative logit error vs float64: llama.cpp {err:.2e}, torch float32 {own:.2e}")
    assert err <= 2 * own, f"{label}: llama.cpp's relative logit error {err:.2e} > 2 x torch float32's {own:.2e}"
    if greedy:
        assert _gguf_greedy(llm, ids, GREEDY_STEPS) == _torch_greedy(model, ids, GREEDY_STEPS, cached)
    llm.close()
    return err, own


@pytest.fixture(scope="module")
def prompt_checked_dense(tmp_path_factory, tokenizer):
    """Per family: a prompt, after the dense tiny model's export (the stock architecture) passed
    the same check on it."""
    cache = {}

    def get(family: str, **overrides):
        key = json.dumps([family, overrides], sort_keys=True)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"dense-{family}")
            model = _tiny(family, **overrides)
            path = export_gguf(_save_dense(model, tokenizer, folder / "model"), folder / "dense.gguf", progress=False)
            ids = torch.randint(3, model.config.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
            _check_f32(path, model, ids, f"dense {family}")
            cache[key] = ids
        return cache[key]

    return get


def _compact_and_export(tmp_path, model, mask, tokenizer, dtype="f32", **biases):
    folder = save_compacted(model, mask, tmp_path / "compacted", tokenizer=tokenizer, **biases)
    from bpp import load_model

    compacted, _ = load_model(folder)
    return export_gguf(folder, tmp_path / "model.gguf", dtype=dtype, progress=False), compacted, folder


KINDS = ["ragged", "ragged+bias", "first-empty", "first-empty+bias"]


# Mistral runs llama.cpp's llama / deci graph as Llama does: one case covers its config
@pytest.mark.parametrize("family, kind", [(f, k) for f in ("llama", "qwen2") for k in KINDS] + [("mistral", "ragged+bias")])
def test_per_layer_sizes_export_to_deci_and_match_torch(tmp_path, tokenizer, prompt_checked_dense, family, kind):
    model = _tiny(family)
    space = MaskSpace.from_model(model)
    mask = _ragged_mask(space, kind.split("+")[0])
    biases = _biases(space) if kind.endswith("+bias") else {}
    path, compacted, folder = _compact_and_export(tmp_path, model, mask, tokenizer, **biases)
    assert _arch(path) == "deci"
    config = json.loads((folder / "config.json").read_text())
    kv = config["kv_heads_per_layer"]
    # the file: the folder's layers, with stand-ins where deci would otherwise drop a computation
    heads = _field(path, "deci.attention.head_count")
    ff = _field(path, "deci.feed_forward_length")
    assert len(heads) == len(kv) == 4
    assert heads[0] == (1 if kind.startswith("first-empty") else 6)
    assert heads[1] == (1 if biases else 0)  # an emptied attention: none, or one zero head for its bias
    assert ff[2] == 1  # layer 3 of the model: attention without MLP channels → one zero channel
    _check_f32(path, compacted, prompt_checked_dense(family), f"{family} {kind}")


@pytest.mark.parametrize("family, arch", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2"),
                                          ("qwen3", "qwen3")])
def test_layers_that_agree_export_to_the_stock_architecture(tmp_path, tokenizer, prompt_checked_dense, family, arch):
    model = _tiny(family)
    space = MaskSpace.from_model(model)
    mask = Masks.full(space, 1)
    g = torch.Generator().manual_seed(2)
    for i in range(space.n_layers):  # 43 channels in every layer; qwen2's stock graph needs all heads
        mask.channels[0, i, torch.randperm(space.n_channels, generator=g)[:27]] = False
        if family != "qwen2":
            mask.groups[0, i, i % 2] = False
    mask.layers[0, 1] = False
    path, compacted, _ = _compact_and_export(tmp_path, model, mask, tokenizer)
    assert _arch(path) == arch
    assert _field(path, f"{arch}.block_count") == N_LAYERS - 1
    assert _field(path, f"{arch}.feed_forward_length") == 43
    _check_f32(path, compacted, prompt_checked_dense(family), f"{family} stock")


def test_qwen2_with_fewer_heads_goes_to_deci(tmp_path, tokenizer, prompt_checked_dense):
    """Uniform sizes, but qwen2's stock graph sizes q and o as (hidden, hidden): the heads no
    longer fill it, so the file is deci, with q/k biases permuted like the weights."""
    model = _tiny("qwen2")
    space = MaskSpace.from_model(model)
    mask = Masks.full(space, 1)
    mask.groups[0, :, 1] = False
    path, compacted, _ = _compact_and_export(tmp_path, model, mask, tokenizer)
    assert _arch(path) == "deci"
    _check_f32(path, compacted, prompt_checked_dense("qwen2"), "qwen2 fewer heads")


@pytest.mark.parametrize("rope", [{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                  {"rope_type": "linear", "factor": 2.0}], ids=["llama3", "linear"])
def test_rope_scaling_is_carried(tmp_path, tokenizer, rope):
    """Llama 3 rope scaling (the rope_freqs tensor) and linear scaling, on a base theta and an
    original context where head_dim 10 has low, smoothed and high frequencies."""
    rope = dict(rope, rope_theta=500.0)
    model = _tiny("llama", rope_parameters=rope)
    assert model.config.rope_parameters["rope_type"] == rope["rope_type"]
    path, compacted, _ = _compact_and_export(tmp_path, model, _ragged_mask(MaskSpace.from_model(model), "ragged"),
                                             tokenizer)
    names = [t.name for t in gguf.GGUFReader(path).tensors]
    assert ("rope_freqs.weight" in names) == (rope["rope_type"] == "llama3")
    # positions past the original context, where the scaled frequencies differ from plain rope
    ids = torch.randint(3, 301, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    plain = _tiny("llama", rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    assert _rel(_torch_logits(plain, ids), _torch_logits(model, ids)) > 1e-3
    dense = export_gguf(_save_dense(model, tokenizer, tmp_path / "dense"), tmp_path / "dense.gguf", progress=False)
    _check_f32(dense, model, ids, f"dense {rope['rope_type']} rope")
    _check_f32(path, compacted, ids, f"pruned {rope['rope_type']} rope")


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_lower_precision_dtypes(tmp_path, tokenizer, dtype):
    """f16 / bf16 / q8_0 files: the pruned model's logit error is within twice what the same dtype
    costs the dense model. Widths are multiples of 32 (hidden 64, head_dim 32, MLP widths 32 and
    64) so q8_0 holds every matrix."""
    shape = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    model = _tiny("llama", **shape)
    space = MaskSpace.from_model(model)
    mask = Masks.full(space, 1)
    g = torch.Generator().manual_seed(4)
    for i, keep in enumerate([64, 32, 96, 0, 64]):
        mask.channels[0, i] = False
        mask.channels[0, i, torch.randperm(space.n_channels, generator=g)[:keep]] = True
    mask.groups[0, 1, 0] = False
    dense = export_gguf(_save_dense(model, tokenizer, tmp_path / "dense"), tmp_path / "dense.gguf", dtype=dtype,
                        progress=False)
    path, compacted, _ = _compact_and_export(tmp_path, model, mask, tokenizer, dtype=dtype)
    ids = torch.randint(3, 301, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    dense_err = _rel(_gguf_logits(_llama(dense), ids), _torch_logits(model, ids))
    err = _rel(_gguf_logits(_llama(path), ids), _torch_logits(compacted, ids))
    print(f"{dtype}: relative logit error pruned {err:.2e}, dense {dense_err:.2e}")
    assert 0 < err <= 2 * dense_err
    assert _field(path, "general.file_type") == {"f16": 1, "bf16": 32, "q8_0": 7}[dtype]


def test_tokenizer_matches_transformers(tmp_path, tokenizer):
    model = _tiny("llama")
    path = export_gguf(_save_dense(model, tokenizer, tmp_path / "m"), tmp_path / "m.gguf", progress=False)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    import pydoc_data.topics

    text = list(pydoc_data.topics.topics.values())[10][:2000]
    assert llm.tokenize(text.encode(), add_bos=True) == tokenizer(text)["input_ids"]
    assert llm.detokenize(tokenizer(text)["input_ids"]).decode() == text


def _sentencepiece_style_tokenizer(gemma: bool = False):
    """A tiny tokenizer shaped like Llama 2's / Mistral's tokenizer.json (SentencePiece converted
    to BPE): '▁' for spaces prepended to the text, byte fallback, BOS added. ``gemma``: shaped like
    Gemma's instead: no '▁' prepended, a split on spaces after the normalizer, Gemma's special
    tokens (<pad> <eos> <bos> <unk>)."""
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if gemma:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        names = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        names = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    specials = list(names.values()) + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(list(pydoc_data.topics.topics.values())[:60], trainer)
    bos = names["bos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, specials.index(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **names)


def test_sentencepiece_style_tokenizer_matches_transformers(tmp_path):
    """Byte-fallback BPE (Llama 2 / Mistral): llama.cpp's SentencePiece tokenizer with scores from
    the merge ranks splits a text as transformers does, bytes for unseen characters included."""
    tok = _sentencepiece_style_tokenizer()
    model = _tiny("mistral", vocab_size=len(tok))
    path = export_gguf(_save_dense(model, tok, tmp_path / "m"), tmp_path / "m.gguf", progress=False)
    assert _field(path, "tokenizer.ggml.model") == "llama"
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    import pydoc_data.topics

    for text in (list(pydoc_data.topics.topics.values())[70][:1500], "Grüße 🦙 and  two  spaces\nnew line"):
        want = tok(text)["input_ids"]
        assert want[0] == tok.bos_token_id and tok.unk_token_id not in want
        assert llm.tokenize(text.encode(), add_bos=True) == want
    llm.close()


# ----------------------------------------------------------------------------- bad inputs

def _no_output(tmp_path, name="out.gguf"):
    assert not (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}")]


def test_bad_inputs_are_one_clear_error_and_leave_no_file(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BppError, match="no config.json"):
        export_gguf(tmp_path / "empty", tmp_path / "out.gguf")
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(BppError, match="'gpt2' has no GGUF export"):
        export_gguf(tmp_path / "gpt2", tmp_path / "out.gguf")
    model = _tiny("llama")
    folder = _save_dense(model, tokenizer, tmp_path / "llama")
    with pytest.raises(BppError, match="q8_0 needs every matrix row width to be a multiple of 32"):
        export_gguf(folder, tmp_path / "out.gguf", dtype="q8_0")
    with pytest.raises(BppError, match="unknown GGUF dtype"):
        export_gguf(folder, tmp_path / "out.gguf", dtype="q4_k")
    _no_output(tmp_path)
    (tmp_path / "no-tokenizer").mkdir()
    model.save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(BppError, match="no tokenizer.json"):
        export_gguf(tmp_path / "no-tokenizer", tmp_path / "out.gguf")
    _no_output(tmp_path)

    (tmp_path / "out.gguf").write_bytes(b"keep me")
    with pytest.raises(BppError, match="exists; pass --force"):
        export_gguf(folder, tmp_path / "out.gguf")
    assert (tmp_path / "out.gguf").read_bytes() == b"keep me"
    export_gguf(folder, tmp_path / "out.gguf", force=True, progress=False)
    assert _arch(tmp_path / "out.gguf") == "llama"


def test_qwen3_with_per_layer_sizes_is_refused(tmp_path, tokenizer):
    model = _tiny("qwen3")
    folder = save_compacted(model, _ragged_mask(MaskSpace.from_model(model), "ragged"), tmp_path / "c",
                            tokenizer=tokenizer)
    with pytest.raises(BppError, match=r"Qwen3 model with per-layer sizes has no GGUF form.*q/k norms"):
        export_gguf(folder, tmp_path / "out.gguf")
    _no_output(tmp_path)


def test_a_failed_write_leaves_no_file(tmp_path, tokenizer, monkeypatch):
    import bpp.gguf.writer as writer_module

    folder = _save_dense(_tiny("llama"), tokenizer, tmp_path / "m")
    calls, encode = [], writer_module.encode

    def broken(t):
        calls.append(t.name)
        if len(calls) == 5:
            raise OSError("disk full")
        return encode(t)

    monkeypatch.setattr(writer_module, "encode", broken)
    (tmp_path / "out.gguf").write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        export_gguf(folder, tmp_path / "out.gguf", force=True, progress=False)
    assert (tmp_path / "out.gguf").read_bytes() == b"old"  # replaced only by a complete file
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ----------------------------------------------------------------------------- the embedded default

def _magnitude_mask(model, space: MaskSpace) -> Masks:
    """About 20% of SmolLM2's prunable parameters, ragged: per layer a kept-channel share drawn in
    [0.65, 1] (seeded) filled by weight magnitude; one KV group fewer in every third layer;
    layer 7 without attention, layer 12 without MLP, layer 20 dropped."""
    g = torch.Generator().manual_seed(20)
    mask = Masks.full(space, 1)
    for i, layer in enumerate(model.model.layers):
        mlp, attn = layer.mlp, layer.self_attn
        score = mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)
        keep = int(space.n_channels * (0.65 + 0.35 * torch.rand((), generator=g)))
        mask.channels[0, i] = False
        mask.channels[0, i, score.topk(keep).indices] = True
        if i % 3 == 1:
            per_group = attn.o_proj.weight.norm(dim=0).view(space.n_groups, -1).sum(1)
            mask.groups[0, i, per_group.argmin()] = False
    mask.groups[0, 7] = False
    mask.channels[0, 12] = False
    mask.layers[0, 20] = False
    return mask


@pytest.mark.slow
def test_embedded_default_pruned_20_percent(tmp_path):
    from bpp import load_model

    model, tok = load_model()
    space = MaskSpace.from_model(model)
    with torch.no_grad():
        mask = _magnitude_mask(model, space)
    sparsity = float(space.total_params - space.params(mask)[0]) / space.prunable_params
    assert 0.17 < sparsity < 0.23, sparsity
    dense_folder = _save_dense(model, tok, tmp_path / "dense")
    dense = export_gguf(dense_folder, tmp_path / "dense.gguf", progress=False)
    assert _arch(dense) == "llama"
    path, compacted, folder = _compact_and_export(tmp_path, model, mask, tok)
    assert _arch(path) == "deci" and _field(path, "deci.block_count") == 29
    import pydoc_data.topics

    text = list(pydoc_data.topics.topics.values())[3][:400]
    ids = tok(text)["input_ids"][:48]
    _check_f32(dense, model, ids, "SmolLM2-135M dense", greedy=False)
    assert json.loads((folder / "config.json").read_text())["kv_heads_per_layer"][0] > 0  # see _torch_greedy
    _check_f32(path, compacted, ids, f"SmolLM2-135M {sparsity:.1%} pruned", cached=True)
    # the tokenizer and chat template travel with it
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=True) == tok(text)["input_ids"]
    assert llm.metadata["tokenizer.chat_template"] == (folder / "chat_template.jinja").read_text()
    assert llm.token_eos() == tok.eos_token_id
    llm.close()


@pytest.mark.slow
def test_bpp_prune_then_export_on_the_embedded_default(tmp_path):
    """The main job ends in a file llama.cpp runs: `bpp prune --export gguf` on the embedded default
    (a short run), and `bpp export` of the same run folder; greedy tokens of both files equal the
    torch compacted model's for 32 steps."""
    import bpp
    from bpp.cli import main

    run = tmp_path / "run"
    # the default policy (its compacted model carries the bias compensation) from FLAP's mask: BESA's
    # init would take minutes on the embedded default
    argv = ["prune", "--out", str(run), "--steps", "2", "--samples", "2", "--batch-size", "1", "--init-windows",
            "4", "--init", "flap", "--no-eval", "--quiet", "--export", "gguf"]
    with _no_exit():
        main(argv)
    report = json.loads((run / "report.json").read_text())
    assert report["export"]["path"] == str(run / "model.gguf")
    with _no_exit():
        main(["export", str(run), "--out", str(tmp_path / "again.gguf"), "--quiet"])
    compacted, tok = bpp.load_model(run / "model")
    import pydoc_data.topics

    ids = tok(list(pydoc_data.topics.topics.values())[5][:300])["input_ids"][:40]
    want = _torch_greedy(compacted, ids, GREEDY_STEPS)
    for path in (run / "model.gguf", tmp_path / "again.gguf"):
        llm = _llama(path)
        assert _gguf_greedy(llm, ids, GREEDY_STEPS) == want, path
        llm.close()


class _no_exit:
    """``bpp.cli.main`` in this process: a non-zero exit fails the test with what it printed."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is SystemExit and value.code not in (0, None):
            raise AssertionError(f"bpp exited with {value.code}")
        return kind is SystemExit
