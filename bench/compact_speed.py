"""The speed a user gets from a compacted model: tokens/s of prefill and decode, dense vs pruned.

Variants are timed round-robin in one process (medians), so machine noise hits all alike.

On the embedded default (SmolLM2-135M-Instruct, fp32, CPU), masks at 20% and 40% of the
prunable parameters, uniform across layers (stock config) and FLAP's heterogeneous allocation
(shipped modeling file). Prefill: one forward of B×T tokens; decode: greedy generation of N new
tokens with the KV cache after a short prompt. Medians of --repeats runs, all in one process.

    .venv/bin/python bench/compact_speed.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import common


def uniform_mask(space, sparsity: float, seed: int = 0):
    """The same fraction of channels and groups pruned in every layer (magnitude-free, random)."""
    from bpp import Masks

    g = torch.Generator().manual_seed(seed)
    mask = Masks.full(space, 1)
    drop_ch = round(sparsity * space.n_channels)
    drop_g = round(sparsity * space.n_groups)
    for i in range(space.n_layers):
        mask.channels[0, i, torch.randperm(space.n_channels, generator=g)[:drop_ch]] = False
        mask.groups[0, i, torch.randperm(space.n_groups, generator=g)[:drop_g]] = False
    return mask


def timed(fn, repeats: int, warm: bool = True) -> float:
    if warm:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 avoids OpenMP spin-waits when the cores are shared)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    import bpp
    from bpp.methods.flap import flap_mask
    from bpp.compaction import compact_model
    from bpp.data import load_text, windows

    model, tok = bpp.load_model()
    space = bpp.MaskSpace.from_model(model)
    ids = windows(tok, load_text("default", "calib"), a.seq_len, a.batch, seed=0)
    calib = windows(tok, load_text("default", "calib"), 128, 16, seed=1)
    prompt = ids[:1, :16]
    variants = [("dense", model, space.total_params)]
    for sparsity in (0.2, 0.4):
        for name, mask in (("uniform", uniform_mask(space, sparsity)), ("FLAP", flap_mask(model, calib, sparsity))):
            t0 = time.perf_counter()
            small = compact_model(model, mask)
            print(f"  compacted {name} {sparsity:.0%} in {time.perf_counter() - t0:.1f}s "
                  f"({'stock config' if not getattr(small.config, 'auto_map', None) else 'per-layer sizes'})", flush=True)
            variants.append((f"{name} {sparsity:.0%}", small, int(space.params(mask)[0])))

    # rounds interleave the variants, so a busy machine slows them alike; medians per variant
    prefill = {name: [] for name, _, _ in variants}
    decode = {name: [] for name, _, _ in variants}
    for name, lm, _ in variants:  # warm-up
        lm(ids), lm.generate(prompt, max_new_tokens=2, do_sample=False)
    for _ in range(a.repeats):
        for name, lm, _ in variants:
            prefill[name].append(timed(lambda: lm(ids), 1, warm=False))
            decode[name].append(timed(lambda: lm.generate(prompt, max_new_tokens=a.new_tokens,
                                                          min_new_tokens=a.new_tokens, do_sample=False), 1, warm=False))
    rows = [(name, params, a.batch * a.seq_len / statistics.median(prefill[name]),
             a.new_tokens / statistics.median(decode[name])) for name, _, params in variants]

    print(f"\nmachine: {common.machine_line()}")
    print(f"prefill: B×T = {a.batch}×{a.seq_len}; decode: {a.new_tokens} new tokens after a 16-token prompt, batch 1\n")
    print("| model | params | prefill tok/s | × dense | decode tok/s | × dense |")
    print("|---|---|---|---|---|---|")
    dense = rows[0]
    for name, params, pre, dec in rows:
        print(f"| {name} | {params / 1e6:.1f} M | {pre:.0f} | {pre / dense[2]:.2f}× | {dec:.1f} | {dec / dense[3]:.2f}× |")


if __name__ == "__main__":
    main()
