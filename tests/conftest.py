"""Shared fixtures. The Triton interpreter must be switched on before any @triton.jit
module is imported, so it is set here, at the very top, for CPU runs."""
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.tiny import FAMILIES, tiny_model, tiny_tokenizer  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny(family):
    """A fresh tiny random model of ``family`` (2 layers, GQA, odd sizes), fp32, eval mode."""
    return tiny_model(family)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()
