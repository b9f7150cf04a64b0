"""Per-op CPU time of the C++ backend (bpp_kernels._C) against the plain-PyTorch reference.

Shapes of the embedded default model, SmolLM2-135M (d=576, m=1536 MLP channels, 9 query heads
in 3 KV groups, head_dim 64), S=8 masks over a B×T = 4×128 batch; each mask keeps 50% of the
channels and 2 of the 3 KV groups (chosen at random per mask, so the masks differ).

Times: every backend in one process, interleaved call by call (a busy machine slows both alike),
the median of --repeats calls after a warm-up; ratio = reference / cpp (> 1: C++ is faster).
The C++ ops are timed twice: with their GEMMs in ATen's mm (``BPP_CPU_GEMM=aten``) and in oneDNN
(``BPP_CPU_GEMM=onednn``), so the gain of the C++ code itself shows apart from the gain of the
GEMM library; the ratio is the reference against the library ``auto`` picks on this CPU.
linear_cross_entropy takes one sample's B×(T-1) rows against the 49,152-word LM head, as the
engine calls it. masked_mlp (the non-gated OPT / GPT-2 / Pythia MLP: up projection with bias, exact
GELU, down projection) runs at the same d and m as masked_swiglu; layer_norm (with bias), rms_norm
and add_rms_norm (the residual add fused) over the S×B×T rows of width d. A second masked_attention
row adds left padding (a quarter of the batch's rows start with T/4 padding tokens), their shifted
positions and a sliding window of T/4 tokens.
Each op's outputs are compared once (relative RMS error against the reference) so a fast but
wrong kernel shows. Numbers are wall-clock and only mean something on an otherwise idle machine.

    .venv/bin/python bench/cpu_ops.py [--repeats 21] [--dtype fp32|bf16|fp16|all] [--ops a,b] [--threads N]
                                      [--markdown]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import bpp_kernels
import common
from bpp_kernels import layout, ops, reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# SmolLM2-135M
D, M, HEADS, GROUPS, HEAD_DIM, VOCAB = 576, 1536, 9, 3, 64, 49152
S, B, T = 8, 4, 128


def _exact_masks(n_samples: int, n_units: int, n_kept: int, g: torch.Generator) -> torch.Tensor:
    mask = torch.zeros(n_samples, n_units, dtype=torch.bool)
    for s in range(n_samples):
        mask[s, torch.randperm(n_units, generator=g)[:n_kept]] = True
    return mask


def _rope(T: int, hd: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    emb = torch.outer(torch.arange(T, dtype=torch.float32), inv).repeat(1, 2)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def op_inputs(dtype: torch.dtype, seed: int = 0) -> dict[str, dict]:
    """kwargs per op at the default model's shapes."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dtype)  # noqa: E731
    channel_mask = _exact_masks(S, M, M // 2, g)
    group_mask = _exact_masks(S, GROUPS, GROUPS - 1, g)
    w_gate_up, w_down_t = layout.pack_swiglu(rnd(M, D, scale=D**-0.5), rnd(M, D, scale=D**-0.5),
                                             rnd(D, M, scale=M**-0.5))
    w_up, w_down_t_mlp, b_up = layout.pack_mlp(rnd(M, D, scale=D**-0.5), rnd(D, M, scale=M**-0.5), rnd(M, scale=0.5))
    w_qkv, w_o_t, _ = layout.pack_attention(rnd(HEADS * HEAD_DIM, D, scale=D**-0.5),
                                            rnd(GROUPS * HEAD_DIM, D, scale=D**-0.5),
                                            rnd(GROUPS * HEAD_DIM, D, scale=D**-0.5),
                                            rnd(D, HEADS * HEAD_DIM, scale=(HEADS * HEAD_DIM) ** -0.5), GROUPS)
    cos, sin = _rope(T, HEAD_DIM, dtype)
    padding = torch.ones(B, T, dtype=torch.bool)
    padding[: max(B // 4, 1), : T // 4] = False
    positions = (padding.long().cumsum(-1) - 1).clamp_min(0)
    keep_idx, keep_count = reference.mask_to_index(channel_mask)
    group_idx, group_count = reference.mask_to_index(group_mask)
    return {
        "mask_to_index": dict(mask=channel_mask),
        "masked_swiglu": dict(x=rnd(S, B, T, D), w_gate_up=w_gate_up, w_down_t=w_down_t, keep_idx=keep_idx,
                              keep_count=keep_count),
        "masked_mlp": dict(x=rnd(S, B, T, D), w_up=w_up, w_down_t=w_down_t_mlp, keep_idx=keep_idx,
                           keep_count=keep_count, b_up=b_up, activation="gelu"),
        "layer_norm": dict(x=rnd(S, B, T, D), weight=1 + rnd(D, scale=0.2), bias=rnd(D, scale=0.1), eps=1e-5),
        "masked_attention": dict(x=rnd(S, B, T, D), w_qkv=w_qkv, w_o_t=w_o_t, cos=cos, sin=sin,
                                 keep_idx=group_idx, keep_count=group_count),
        f"masked_attention (padding, window {T // 4})": dict(
            x=rnd(S, B, T, D), w_qkv=w_qkv, w_o_t=w_o_t, cos=cos, sin=sin, keep_idx=group_idx,
            keep_count=group_count, position_ids=positions, attention_mask=padding, window=T // 4),
        "linear_cross_entropy": dict(h=rnd(B * (T - 1), D), weight=rnd(VOCAB, D, scale=D**-0.5),
                                     target=torch.randint(0, VOCAB, (B * (T - 1),), generator=g)),
        # drawn last, so the other ops' inputs stay those of earlier runs
        "rms_norm": dict(x=rnd(S, B, T, D), weight=1 + rnd(D, scale=0.2), eps=1e-5),
        "add_rms_norm": dict(x=rnd(S, B, T, D), residual=rnd(S, B, T, D), weight=1 + rnd(D, scale=0.2), eps=1e-5),
    }


def _rel_err(ref, out) -> float:
    if isinstance(ref, tuple):
        return max(_rel_err(r, o) for r, o in zip(ref, out))
    ref, out = ref.double(), out.double()
    return ((ref - out).norm() / ref.norm().clamp_min(1e-30)).item()


VARIANTS = {"reference": ("reference", None), "cpp/mm": ("cpp", "aten"), "cpp/onednn": ("cpp", "onednn")}


def _run(fn, kwargs: dict, variant: str):
    backend, gemm = VARIANTS[variant]
    if gemm is None:
        return fn(**kwargs, backend=backend)
    os.environ["BPP_CPU_GEMM"] = gemm
    try:
        return fn(**kwargs, backend=backend)
    finally:
        os.environ.pop("BPP_CPU_GEMM")


def time_op(op: str, kwargs: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each variant, interleaved call by call."""
    fn = getattr(ops, op.split()[0])  # "masked_attention (padding, ...)": a variant of the op's inputs
    for variant in VARIANTS:  # warm-up: allocator, MKL/oneDNN kernel selection
        _run(fn, kwargs, variant)
    samples = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for variant in VARIANTS:
            start = time.perf_counter()
            _run(fn, kwargs, variant)
            samples[variant].append(time.perf_counter() - start)
    return {v: statistics.median(x) for v, x in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--dtype", choices=(*DTYPES, "all"), default="all")
    parser.add_argument("--ops", default="", help="comma-separated ops to time (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    wanted = [op for op in args.ops.split(",") if op]
    unknown = sorted(set(wanted) - set(op_inputs(torch.float32))) if wanted else []
    if unknown:
        raise SystemExit(f"--ops: unknown {', '.join(unknown)}; choose from {', '.join(op_inputs(torch.float32))}")
    if ops.resolve("masked_swiglu", "cpu", None) != "cpp" and not ops._cpp_module():
        raise SystemExit("bpp_kernels._C is not built: run `python setup.py build_ext --inplace` first")

    cpu = common.cpu_name()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {cpu}, {os.cpu_count()} cores, load average {load:.1f}; python {platform.python_version()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}), "
          f"bpp_kernels {bpp_kernels.__version__}")
    print(f"shapes: SmolLM2-135M d={D} m={M} heads={HEADS} groups={GROUPS} hd={HEAD_DIM}; S={S} B×T={B}×{T}; "
          f"keep {M // 2}/{M} channels and {GROUPS - 1}/{GROUPS} groups per mask; median of {args.repeats}")

    from bpp_kernels import cpp

    auto = "cpp/onednn" if cpp.gemm_library() == "onednn" else "cpp/mm"
    print(f"auto GEMM library of the C++ ops on this CPU: {auto.split('/')[1]} (ratio and rel err use it)")
    header = ("op", "dtype", "reference ms", "cpp/mm ms", "cpp/onednn ms", "ratio ref/cpp", "rel err")
    rows = []
    for name in DTYPES if args.dtype == "all" else (args.dtype,):
        dtype = DTYPES[name]
        for op, kwargs in op_inputs(dtype).items():
            if wanted and op not in wanted:
                continue
            if op == "mask_to_index" and name != next(iter(DTYPES)):
                continue  # dtype-free: time once
            t = time_op(op, kwargs, args.repeats)
            fn = getattr(ops, op.split()[0])
            err = _rel_err(_run(fn, kwargs, "reference"), _run(fn, kwargs, auto))
            rows.append((op, "bool" if op == "mask_to_index" else name, f"{t['reference'] * 1e3:.3f}",
                         f"{t['cpp/mm'] * 1e3:.3f}", f"{t['cpp/onednn'] * 1e3:.3f}", f"{t['reference'] / t[auto]:.2f}",
                         f"{err:.1e}"))
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        for row in (header, *rows):
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


if __name__ == "__main__":
    main()
