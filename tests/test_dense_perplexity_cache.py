"""The dense model's held-out perplexity is kept by bpp.results_cache under $BPP_CACHE, by a digest of
weights, config, text and options."""
import pytest
import torch

from bpp import evaluation
from tests.tiny import tiny_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BPP_CACHE", str(tmp_path))
    monkeypatch.setenv("BPP_RESULTS_CACHE", "1")
    return tmp_path / "perplexity"


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = evaluation.perplexity

    def perplexity(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "perplexity", perplexity)
    return calls


def _ids(seed=0, n=200):
    return torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(seed))


def test_a_second_call_reads_the_cache_and_gives_the_same_value(cache, counted):
    model = tiny_model("llama")
    first = evaluation.dense_perplexity(model, _ids(), 16, None)
    second = evaluation.dense_perplexity(model, _ids(), 16, None)
    assert first == second and len(counted) == 1 and len(list(cache.glob("*.pt"))) == 1
    assert first == evaluation.perplexity(model, None, _ids(), seq_len=16)


def test_other_weights_text_or_options_are_computed_again(cache, counted):
    model = tiny_model("llama")
    evaluation.dense_perplexity(model, _ids(), 16, None)
    evaluation.dense_perplexity(model, _ids(seed=1), 16, None)  # another text
    evaluation.dense_perplexity(model, _ids(), 8, None)  # another window length
    evaluation.dense_perplexity(model, _ids(), 16, 3)  # fewer windows
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # one weight of one layer
    changed = evaluation.dense_perplexity(model, _ids(), 16, None)
    assert len(counted) == 5 and len(list(cache.glob("*.pt"))) == 5
    assert changed == evaluation.perplexity(model, None, _ids(), seq_len=16)


def test_a_corrupt_cache_file_is_computed_again_and_rewritten(cache, counted):
    model = tiny_model("llama")
    value = evaluation.dense_perplexity(model, _ids(), 16, None)
    (path,) = cache.glob("*.pt")
    path.write_text("{not json")
    assert evaluation.dense_perplexity(model, _ids(), 16, None) == value and len(counted) == 2
    assert evaluation.dense_perplexity(model, _ids(), 16, None) == value and len(counted) == 2


def test_an_unwritable_cache_still_gives_the_perplexity(tmp_path, monkeypatch, counted):
    monkeypatch.setenv("BPP_RESULTS_CACHE", "1")
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("BPP_CACHE", str(blocker))  # a file where the cache folder should be
    model = tiny_model("llama")
    assert evaluation.dense_perplexity(model, _ids(), 16, None) == evaluation.perplexity(model, None, _ids(), seq_len=16)


def test_gemma3_with_its_zero_dim_buffer_is_cached(cache, counted):
    from tests.tiny import tiny_gemma3

    model = tiny_gemma3()
    assert any(b.dim() == 0 for b in model.buffers())  # the embedding scale
    first = evaluation.dense_perplexity(model, _ids(), 16, None)
    assert evaluation.dense_perplexity(model, _ids(), 16, None) == first and len(counted) == 1


def test_a_config_change_without_a_weight_change_is_computed_again(cache, counted):
    from tests.tiny import tiny_gemma3

    narrow, wide = tiny_gemma3(sliding_window=4), tiny_gemma3(sliding_window=64)  # the same weights
    a = evaluation.dense_perplexity(narrow, _ids(), 32, None)
    b = evaluation.dense_perplexity(wide, _ids(), 32, None)
    assert len(counted) == 2 and a != b


def test_turned_off_it_computes_every_time_and_writes_nothing(cache, counted, monkeypatch):
    monkeypatch.setenv("BPP_RESULTS_CACHE", "0")
    model = tiny_model("llama")
    evaluation.dense_perplexity(model, _ids(), 16, None)
    evaluation.dense_perplexity(model, _ids(), 16, None)
    assert len(counted) == 2 and not cache.exists()
