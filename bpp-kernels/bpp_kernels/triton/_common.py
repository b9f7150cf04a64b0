"""Shared helpers of the Triton kernels: tile configurations and dot precision.

Tile sizes depend only on the problem's per-sample sizes (rows, d, m, head_dim), never on the
number of samples S, so a mask's result does not change with the batch it runs in. No
autotuning: a timing-based choice could differ between two runs and break bit-for-bit
reproducibility. Under the interpreter one small config is pinned (it runs on the CPU, where
big tiles only cost time).
"""
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


def gemm_config(dtype: torch.dtype, rows: int) -> dict:
    """Blocks of a (rows × reduction) @ (reduction × cols) tile kernel: BLOCK_N rows, BLOCK_C
    output columns (or gathered channels), BLOCK_K reduction, plus launch options.

    GPU: 128-row tiles once there are enough rows (fewer re-reads of the gathered weights); fp32
    ieee dots need twice the registers and shared memory of 16-bit ones, hence smaller tiles.
    """
    if INTERPRET:
        return dict(BLOCK_N=32, BLOCK_C=32, BLOCK_K=32, num_warps=4, num_stages=1)
    block_n = 128 if rows >= 128 else 64 if rows >= 64 else 32
    if dtype == torch.float32:
        return dict(BLOCK_N=min(block_n, 64), BLOCK_C=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK_N=block_n, BLOCK_C=128 if block_n == 128 else 64, BLOCK_K=64, num_warps=8 if block_n == 128 else 4,
                num_stages=3)

