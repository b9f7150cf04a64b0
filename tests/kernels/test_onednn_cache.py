"""Importing bpp_kernels raises oneDNN's kernel cache to 16,384 shapes unless the caller chose a size."""
import os
import subprocess
import sys

VAR = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
SCRIPT = "import os, bpp_kernels; print(os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'))"


def _capacity_after_import(value):
    env = {k: v for k, v in os.environ.items() if k != VAR}
    if value is not None:
        env[VAR] = value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_import_sets_a_capacity_above_the_shapes_of_a_pass():
    # one pass of S = 8 masks over SmolLM2's 30 layers runs 1,344 GEMMs of per-sample shapes
    assert int(_capacity_after_import(None)) >= 8 * 30 * 6


def test_a_capacity_the_caller_chose_is_kept():
    assert _capacity_after_import("2048") == "2048"
    assert _capacity_after_import("0") == "0"  # 0 turns oneDNN's cache off
