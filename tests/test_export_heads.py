"""GGUF export of models whose query heads were pruned inside KV groups (query-head slots):
llama.cpp reads per-layer head counts (``deci.attention.head_count`` as an array), and the file,
run in llama.cpp itself, gives the torch compacted model's logits and greedy tokens (the rules of
tests/test_export.py, whose helpers this reuses)."""
import json

import pytest
import torch

from bpp import Masks, MaskSpace
from tests.test_export import (N_LAYERS, _arch, _biases, _check_f32, _compact_and_export, _field, _tiny,
                               prompt_checked_dense, tokenizer)  # noqa: F401  (fixtures)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("biased", [False, True], ids=["plain", "bias"])
def test_per_layer_head_slots_export_to_deci_and_match_torch(tmp_path, tokenizer, prompt_checked_dense, family,  # noqa: F811
                                                            biased):
    model = _tiny(family)
    space = MaskSpace.from_model(model)
    mask = Masks.full(space, 1)
    mask.heads = torch.ones(1, N_LAYERS, space.heads_per_group, dtype=torch.bool)
    mask.heads[0, 0, 1] = False  # 2 groups of 2 heads
    mask.heads[0, 1] = False  # no attention left
    mask.heads[0, 2, :2] = False  # 2 groups of 1 head
    mask.groups[0, 3, 0] = False  # 1 group of 3 heads
    mask.heads[0, 4, 0] = False
    mask.groups[0, 4, 1] = False  # 1 group of 2 heads
    mask.channels[0, 4, :20] = False
    biases = _biases(space) if biased else {}
    path, compacted, folder = _compact_and_export(tmp_path, model, mask, tokenizer, **biases)
    config = json.loads((folder / "config.json").read_text())
    assert config["heads_per_group_per_layer"] == [2, 0, 1, 3, 2]
    assert _arch(path) == "deci"
    assert list(_field(path, "deci.attention.head_count")) == [4, 1 if biased else 0, 2, 3, 2]
    assert list(_field(path, "deci.attention.head_count_kv")) == [2, 1 if biased else 0, 2, 1, 1]
    _check_f32(path, compacted, prompt_checked_dense(family), f"{family} head slots")


def test_uniform_head_slots_export_to_the_stock_architecture(tmp_path, tokenizer, prompt_checked_dense):  # noqa: F811
    model = _tiny("llama")
    space = MaskSpace.from_model(model)
    mask = Masks.full(space, 1)
    mask.heads = torch.ones(1, N_LAYERS, space.heads_per_group, dtype=torch.bool)
    mask.heads[0, :, 2] = False
    path, compacted, folder = _compact_and_export(tmp_path, model, mask, tokenizer)
    assert not json.loads((folder / "config.json").read_text()).get("auto_map")
    assert _arch(path) == "llama"
    assert _field(path, "llama.attention.head_count") == 4 and _field(path, "llama.attention.head_count_kv") == 2
    _check_f32(path, compacted, prompt_checked_dense("llama"), "llama uniform head slots")


def test_gemma3_with_uniform_head_slots_exports_as_gemma3(tmp_path, tokenizer):  # noqa: F811
    """Gemma 3 270M has one KV group: its query heads are pruned as slots. The tiny one has 2 groups
    of 2 heads; one slot in every layer keeps 2 heads, the stock config, and llama.cpp's gemma3."""
    from bpp import export_gguf, load_model
    from bpp.compaction import save_compacted
    from tests.test_gguf_gemma3 import _check, _gemma

    model = _gemma()
    space = MaskSpace.from_model(model)
    mask = Masks.full(space, 1)
    mask.heads = torch.ones(1, space.n_layers, space.heads_per_group, dtype=torch.bool)
    mask.heads[0, :, 0] = False
    folder = save_compacted(model, mask, tmp_path / "c", tokenizer=tokenizer)
    path = export_gguf(folder, tmp_path / "c.gguf", progress=False)
    assert _arch(path) == "gemma3" and _field(path, "gemma3.attention.head_count") == 2
    _check(path, load_model(folder)[0], "gemma3 with one slot of two")


def test_gemma3_with_per_layer_head_slots_is_refused_in_one_line(tmp_path, tokenizer):  # noqa: F811
    from bpp import export_gguf
    from bpp.compaction import save_compacted
    from bpp.errors import BppError
    from tests.test_gguf_gemma3 import _gemma

    model = _gemma()
    space = MaskSpace.from_model(model)
    mask = Masks.full(space, 1)
    mask.heads = torch.ones(1, space.n_layers, space.heads_per_group, dtype=torch.bool)
    mask.heads[0, 1, 0] = False
    folder = save_compacted(model, mask, tmp_path / "c", tokenizer=tokenizer)
    with pytest.raises(BppError, match="Gemma 3 model with per-layer sizes has no GGUF form") as e:
        export_gguf(folder, tmp_path / "out.gguf")
    assert "\n" not in str(e.value)
