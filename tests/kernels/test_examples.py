"""The two examples of the bpp_kernels API, run on tiny sizes: the loss goes down and the learned
masks meet their target; and ``import bpp_kernels`` does not import transformers."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    """The examples' tiny ops finish faster on one thread than waiting for a second one on a busy host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_hard_concrete_masks_learn_to_their_target_sparsity(one_thread):
    result = _load("hard_concrete_masks").main(steps=60, target_keep=0.5)
    assert result["last_loss"] < 0.7 * result["first_loss"], (result["first_loss"], result["last_loss"])
    for unit, kept in result["expected_keep"].items():
        assert abs(kept - 0.5) < 0.05, f"{unit}: expected kept fraction {kept:.3f}, target 0.5"
    for unit, mask in result["masks"].items():  # deterministic masks: round(expected L0) units per layer
        assert abs(mask.float().mean().item() - 0.5) <= 0.05 + 1.0 / mask.shape[1], unit
        assert mask.any(1).all(), f"{unit}: a layer lost every unit"


def test_supernet_every_width_improves_and_wider_is_better(one_thread):
    result = _load("supernet_mlp").main(steps=100)
    assert result["last_loss"] < 0.7 * result["first_loss"], (result["first_loss"], result["last_loss"])
    before, after = result["held_out_before"], result["held_out_after"]
    widths = sorted(after)
    for w in widths:
        assert after[w] < 0.8 * before[w], f"width {w}: held-out loss {before[w]:.4f} -> {after[w]:.4f}"
    for narrow, wide in zip(widths, widths[1:]):
        assert after[wide] < after[narrow], f"width {wide} ({after[wide]:.4f}) is not better than {narrow} ({after[narrow]:.4f})"


def test_import_does_not_pull_transformers():
    code = ("import sys, torch, bpp_kernels as K\n"
            "K.mask_to_index(torch.ones(2, 3, dtype=torch.bool)); K.backend_info()\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'bpp')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.join(EXAMPLES, ".."))
