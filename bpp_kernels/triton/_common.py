"""Shared helpers of the Triton kernels."""
from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: full-precision dot products (no TF32) so results match the reference."""
    return "ieee" if dtype == torch.float32 else "tf32"
