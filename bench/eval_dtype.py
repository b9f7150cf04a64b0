"""Masks judged in bfloat16: how much faster, and do they still order masks as float32 does?

`bpp prune --dtype auto` (the default) keeps the model in float32 and, on a device with native
bf16 (a CPU with AVX512-BF16 / AMX-BF16), judges masks with ``MaskedModel(dtype=bfloat16)``: the
projections in bf16, the residual stream, norms, loss and the soft objective's teacher in float32.
This script builds the allocation policy's start as `bpp prune` does (``--init``'s per-layer
counts, FLAP's ranking, 32 calibration windows of 256 tokens, seed 0), draws the policy's own
masks around it (S = 8 per step: 4 antithetic pairs at σ = 0.05, new directions every step) and,
for each of ``--steps`` of the search's batches (2 windows × 128 tokens), computes the search's
loss (soft objective, bias compensation) of the same masks on the same batch with a float32 and
a bfloat16 engine, alternating which goes first. It reports masks/s of each (median step time)
and how often the bf16 losses order a pair of masks as the float32 ones do: all 28 pairs of a
step, and the 4 antithetic pairs (the differences the gradient uses).

    OMP_NUM_THREADS=1 python bench/eval_dtype.py --sparsity 0.4 --steps 12 --json bench/results/eval-dtype.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from common import load_default, machine_line, utc_now
from reconstruction_proxy import masks_around_start

from bpp.masks import Masks
from bpp.models.masked import MaskedModel
from bpp.search import calibration_batches
from bpp.search.objective import MaskLosses


def agreement(a: torch.Tensor, b: torch.Tensor, pairs) -> tuple[int, list[float], list[float]]:
    """How many of ``pairs`` (i, j) have loss differences of one sign in ``a`` and ``b``, and the
    differences themselves."""
    da = [float(a[i] - a[j]) for i, j in pairs]
    db = [float(b[i] - b[j]) for i, j in pairs]
    return sum((x > 0) == (y > 0) for x, y in zip(da, db)), da, db


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.4)
    ap.add_argument("--init", default="flap", help="the start's per-layer counts: flap (fast) | besa (bpp prune's)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--sigma", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="bench/results/eval-dtype.json")
    args = ap.parse_args()

    default = load_default()
    model, tok = default.model, default.tok
    S = 8
    with torch.no_grad():
        config, comp, _, _, drawn, _ = masks_around_start(model, tok, default.calib, args.sparsity, args.init,
                                                          {args.sigma: S // 2 * args.steps}, args.seed)
    batches = calibration_batches(default.calib, config)
    engines = {"float32": MaskLosses(MaskedModel(model), compensation=comp, objective="soft"),
               "bfloat16": MaskLosses(MaskedModel(model, dtype=torch.bfloat16), compensation=comp, objective="soft")}
    all_pairs = list(itertools.combinations(range(S), 2))
    anti = [(i, i + 1) for i in range(0, S, 2)]  # masks_around_start interleaves (+, −)
    seconds = {k: [] for k in engines}
    rows = []
    for step in range(args.steps):
        masks = Masks.cat(drawn[step * S:(step + 1) * S])
        ids = batches[step * config.batch_size:(step + 1) * config.batch_size]
        with torch.no_grad():
            teacher = engines["float32"].engine.teacher(ids)
            for k in engines.values():
                k._teachers = [(ids.clone(), teacher)]  # one float32 teacher for both, as bpp prune has
            losses = {}
            order = list(engines) if step % 2 == 0 else list(reversed(engines))
            for name in order:
                t0 = time.perf_counter()
                losses[name] = engines[name](ids, masks)
                seconds[name].append(time.perf_counter() - t0)
        n_all, d32, d16 = agreement(losses["float32"], losses["bfloat16"], all_pairs)
        n_anti, a32, a16 = agreement(losses["float32"], losses["bfloat16"], anti)
        rows.append({"step": step, "losses": {k: v.tolist() for k, v in losses.items()}, "all_pairs_alike": n_all,
                     "antithetic_alike": n_anti, "antithetic_float32": a32, "antithetic_bfloat16": a16,
                     "seconds": {k: v[-1] for k, v in seconds.items()}})
        print(f"step {step}: float32 {seconds['float32'][-1]:.2f}s, bfloat16 {seconds['bfloat16'][-1]:.2f}s; "
              f"pairs alike {n_all}/{len(all_pairs)}, antithetic {n_anti}/{len(anti)}; "
              f"median |Δ| {statistics.median(abs(x) for x in a32):.4f}, "
              f"median |Δbf16 − Δfp32| {statistics.median(abs(x - y) for x, y in zip(a32, a16)):.4f}", flush=True)
    med = {k: statistics.median(v[1:] or v) for k, v in seconds.items()}  # the first step warms up
    anti32 = [x for r in rows for x in r["antithetic_float32"]]
    anti16 = [x for r in rows for x in r["antithetic_bfloat16"]]
    summary = {
        "masks_per_s": {k: S / v for k, v in med.items()},
        "speedup": med["float32"] / med["bfloat16"],
        "all_pairs_alike": sum(r["all_pairs_alike"] for r in rows) / (len(all_pairs) * len(rows)),
        "antithetic_alike": sum(r["antithetic_alike"] for r in rows) / (len(anti) * len(rows)),
        "median_abs_antithetic_difference": statistics.median(abs(x) for x in anti32),
        "median_abs_error_of_difference": statistics.median(abs(x - y) for x, y in zip(anti32, anti16)),
    }
    out = {"meta": {"date": utc_now(), "machine": machine_line(), "command": "python " + " ".join(sys.argv),
                    "sparsity": args.sparsity, "init": args.init, "sigma": args.sigma, "S": S,
                    "batch": f"{config.batch_size} x {config.seq_len}"}, "summary": summary, "steps": rows}
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\n{machine_line()}; sparsity {args.sparsity:g}, {args.steps} steps of S = {S} masks on "
          f"{config.batch_size} x {config.seq_len} tokens\n")
    print("| engine | s/step (median) | masks/s |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} | {S / v:.2f} |")
    print(f"\nbf16 / fp32 masks/s: {summary['speedup']:.2f}x; mask pairs ordered alike: "
          f"{100 * summary['all_pairs_alike']:.1f}% of {len(all_pairs) * len(rows)}, antithetic pairs: "
          f"{100 * summary['antithetic_alike']:.1f}% of {len(anti) * len(rows)} (median |Δ| "
          f"{summary['median_abs_antithetic_difference']:.4f}, median error of Δ "
          f"{summary['median_abs_error_of_difference']:.4f})")


if __name__ == "__main__":
    main()
