"""A projection, not a measurement: masks per GPU-hour on an H100 for Llama-3-8B, from FLOPs and
bytes per mask evaluation and the roofline, for the batched masked kernels against one Hugging
Face forward per mask (the paper's official evaluation, multiplicative masks, full logits).

Counts per mask of ``--tokens`` tokens (``--batch`` windows of ``--seq-len``), with a fraction
``keep`` of every layer's MLP channels and KV groups kept (query heads with their groups):
- FLOPs: 2 per multiply-add of the kept q/k/v/o and gate/up/down projections, the causal
  attention (scores and values, on average (T+1)/2 keys per query), and the LM head over the
  whole vocabulary; the pruned work is absent for the batched kernels and present (multiplied
  by zero) for the hook forward.
- Bytes: bf16 weights read once per mask (the kept ones for the batched kernels; all for the hook
  forward; the LM head once per pass of ``--samples`` masks for the batched kernels, whose fused
  loss never writes logits), activations read and written ``ACT_TRAFFIC`` times per layer, and
  for the hook forward the logits written in bf16 and read back in float32 by the loss.
Time per mask = max(FLOPs / peak, bytes / bandwidth) (the roofline); masks/hour = 3600 / time.

The CPU line turns this into an expectation: the same count for SmolLM2-135M at the CPU bench's
shape, the masks/s measured there (``--cpu-masks-per-s``, from bench/eval_dtype.py or
bench/masked_forward.py on this host), and the FLOP/s of a large GEMM measured here in the same
dtype give the fraction of attainable peak the batched engine reaches on the CPU; the last column
applies that fraction to the H100 roofline.

    python bench/gpu_projection.py --cpu-masks-per-s 1.9 --cpu-dtype bfloat16
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from common import machine_line

H100 = {"name": "H100 SXM (bf16 dense tensor cores, HBM3)", "flops": 989.4e12, "bandwidth": 3.35e12}
ACT_TRAFFIC = 12  # (tokens, d) activation reads + writes per layer: norms, residual adds, projections' in/out


@dataclass
class Shape:
    name: str
    d: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int


LLAMA3_8B = Shape("Llama-3-8B", 4096, 32, 32, 8, 128, 14336, 128256)
SMOLLM2_135M = Shape("SmolLM2-135M", 576, 30, 9, 3, 64, 1536, 49152)


def layer_params(s: Shape, keep: float) -> float:
    attn = s.d * s.head_dim * (2 * s.heads + 2 * s.kv_heads) * keep
    return attn + 3 * s.d * s.mlp * keep


def flops_per_mask(s: Shape, keep: float, batch: int, seq: int) -> float:
    tokens = batch * seq
    proj = 2 * tokens * layer_params(s, keep)
    attention = 2 * 2 * tokens * s.head_dim * s.heads * keep * (seq + 1) / 2
    head = 2 * tokens * s.d * s.vocab
    return s.layers * (proj + attention) + head


def bytes_per_mask(s: Shape, keep: float, batch: int, seq: int, samples: int, hook: bool, width: int = 2) -> float:
    tokens = batch * seq
    weights = s.layers * layer_params(s, 1.0 if hook else keep) * width
    head = s.d * s.vocab * width / (1 if hook else samples)
    acts = s.layers * ACT_TRAFFIC * tokens * s.d * width
    logits = tokens * s.vocab * (width + 4) if hook else 0.0
    return weights + head + acts + logits


def roofline_masks_per_hour(flops: float, nbytes: float, device: dict) -> tuple[float, str]:
    t_compute, t_memory = flops / device["flops"], nbytes / device["bandwidth"]
    return 3600.0 / max(t_compute, t_memory), "compute" if t_compute >= t_memory else "memory"


def gemm_flops_per_s(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Attainable FLOP/s of this CPU: the best of ``repeats`` n×n×n GEMMs in ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keeps", default="0.8,0.6,0.4", help="kept fractions (20/40/60%% sparsity)")
    ap.add_argument("--batch", type=int, default=2, help="windows per mask evaluation")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--samples", type=int, default=8, help="masks per batched pass")
    ap.add_argument("--cpu-masks-per-s", type=float, default=None, help="measured batched masks/s on this CPU")
    ap.add_argument("--cpu-dtype", default="bfloat16", help="the dtype that CPU measurement used")
    ap.add_argument("--cpu-keep", type=float, default=0.6, help="the kept fraction of that measurement")
    ap.add_argument("--cpu-batch", type=int, default=2)
    ap.add_argument("--cpu-seq-len", type=int, default=128)
    args = ap.parse_args()
    keeps = [float(k) for k in args.keeps.split(",")]

    efficiency = None
    if args.cpu_masks_per_s:
        dtype = getattr(torch, args.cpu_dtype)
        peak = gemm_flops_per_s(dtype)
        achieved = args.cpu_masks_per_s * flops_per_mask(SMOLLM2_135M, args.cpu_keep, args.cpu_batch, args.cpu_seq_len)
        efficiency = achieved / peak
        print(f"CPU: {machine_line()}; {args.cpu_dtype} GEMM 2048³: {peak / 1e9:.0f} GFLOP/s; batched engine "
              f"{args.cpu_masks_per_s:g} masks/s of SmolLM2-135M at keep {args.cpu_keep:g}, "
              f"{args.cpu_batch}×{args.cpu_seq_len} tokens = {achieved / 1e9:.0f} GFLOP/s, {100 * efficiency:.0f}% of "
              "that GEMM rate\n")
    s = LLAMA3_8B
    print(f"PROJECTION (roofline, not measured): {s.name} on one {H100['name']}: "
          f"{H100['flops'] / 1e12:.0f} TFLOP/s, {H100['bandwidth'] / 1e12:.2f} TB/s; a mask = "
          f"{args.batch}×{args.seq_len} tokens, {args.samples} masks per batched pass\n")
    head = "| kept | method | GFLOP / mask | MB read+written / mask | bound | masks / GPU-hour (roofline) |"
    if efficiency is not None:
        head += " at the CPU's efficiency |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for keep in keeps:
        for hook in (False, True):
            f = flops_per_mask(s, 1.0 if hook else keep, args.batch, args.seq_len)
            b = bytes_per_mask(s, keep, args.batch, args.seq_len, args.samples, hook)
            per_hour, bound = roofline_masks_per_hour(f, b, H100)
            row = (f"| {keep:.0%} | {'hook forward (a)' if hook else 'batched kernels'} | {f / 1e9:,.0f} | "
                   f"{b / 1e6:,.0f} | {bound} | {per_hour:,.0f} |")
            if efficiency is not None:
                row += f" {per_hour * efficiency:,.0f} |"
            print(row)


if __name__ == "__main__":
    main()
