"""Quality table of `bpp prune` on the embedded default (SmolLM2-135M-Instruct): held-out
perplexity (seq_len 128, the default text's held-out part) of the dense model, metric masks and
the policy-gradient variants, at 20% and 40% sparsity of the prunable (group + channel)
parameters. Prints a Markdown table and writes it, with the raw numbers, as JSON.

    python bench/quality.py            # the full table (long on CPU)
    python bench/quality.py --quick    # fewer PG steps and held-out windows

Rows:
- magnitude, wanda-sp: layer-uniform metric masks at the same per-type keep counts as PG (the
  wanda-sp one is PG's "init mask").
- wanda-sp θ₀ (global top-k): PG after 0 steps: the highest sigmap(wanda-sp) probabilities
  under the global per-type budget; what the policy gradient itself adds is measured from here.
- FLAP: its mask alone, and compacted with its bias compensation (FLAP as published); the default
  PG mask is also shown with the same bias compensation (`bpp compact --bias-compensation`).
- the companion methods (LoRAPrune, BESA, Pangu Light re-initialisation, LoRA recovery) at the
  same parameter count: bench/quality_companions.py.
- PG variants of `--policy units` (no bias compensation in the loss, no incumbent; the default
  allocation policy is measured by bench/quality_allocation.py): S=2 moving average (the
  official setting), S=8 moving average (the units policy's default),
  S=8 leave-one-out baseline, S=8 with the joint parameter budget. Same steps and batches for all,
  so S=2 does a quarter of the forward work.
"""
from __future__ import annotations

import argparse
import time

import torch

import common
from bpp.data import windows
from bpp.search import PruneConfig  # noqa: E402
from bpp.methods import initialise, prior_mask
from bpp.budget import Budget
from bpp.space import MaskSpace

PG_VARIANTS = {
    "PG S=2 moving-avg (official)": dict(samples=2, baseline="moving-average"),
    common.UNITS_DEFAULT_ROW: common.UNITS_DEFAULT,
    "PG S=8 leave-one-out": dict(samples=8, baseline="leave-one-out"),
    "PG S=8 --budget params": dict(samples=8, budget="params"),
    # every KV group kept, the whole parameter cut taken from MLP channels (the allocation BESA and
    # FLAP find on SmolLM2): --granularity channel at the channel sparsity of equal parameters
    "PG S=8 channels only (all KV groups kept)": dict(samples=8, granularity="channel"),
}


def equal_param_sparsity(space: MaskSpace, sparsity: float, granularity: str) -> float:
    """The sparsity of ``granularity``'s units that removes the parameters ``sparsity`` removes
    from all group + channel parameters (channel-only: more of the channels)."""
    if granularity != "channel":
        return sparsity
    channel_total = space.n_layers * space.n_channels * space.channel_params
    return sparsity * space.prunable_params / channel_total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="30 PG steps, 40 held-out windows")
    ap.add_argument("--sparsities", default="0.2,0.4")
    ap.add_argument("--steps", type=int, default=None, help="PG steps (default: bpp prune's default; 30 with --quick)")
    ap.add_argument("--eval-windows", type=int, default=None, help="held-out windows per perplexity (default all)")
    ap.add_argument("--variants", default=None, help="comma-separated subset of PG variant names (substring match)")
    ap.add_argument("--lr", type=float, default=None, help="override the PG learning rate")
    ap.add_argument("--engine", default=None, help="batched | hooks (default: bpp prune's)")
    ap.add_argument("--json", default="bench/results/quality.json", help="where to write the raw results")
    args = ap.parse_args()

    defaults = PruneConfig(**common.UNITS).validate()
    steps = args.steps or (30 if args.quick else defaults.steps)
    eval_windows = args.eval_windows or (40 if args.quick else None)
    variants = {k: v for k, v in PG_VARIANTS.items()
                if not args.variants or any(s.strip() in k for s in args.variants.split(","))}
    default = common.load_default()
    model, tok, space = default.model, default.tok, default.space
    init_calib = windows(tok, default.calib, defaults.init_seq_len, defaults.init_windows, seed=defaults.seed)
    table = common.QualityTable(model, tok, space, default.held, eval_windows)

    with torch.no_grad():
        table.mask("dense", 0.0, None, 0.0)
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            t0 = time.perf_counter()
            table.mask("magnitude (layer-uniform)", sparsity, prior_mask(model, space, "magnitude", sparsity),
                       time.perf_counter() - t0)
            t0 = time.perf_counter()
            budget = Budget(space, "group,channel", sparsity)
            theta, wanda_mask, _ = initialise(budget, "wanda-sp", model, init_calib)
            init_seconds = time.perf_counter() - t0
            table.mask("wanda-sp (layer-uniform)", sparsity, wanda_mask, init_seconds)
            table.mask("wanda-sp θ₀ (global top-k)", sparsity, budget.final_mask(theta), init_seconds, "PG after 0 steps")
            from bpp.bias_compensation import InputStats
            from bpp.methods.flap import flap_mask

            t0 = time.perf_counter()
            stats = InputStats(model).collect(init_calib)
            flap = flap_mask(model, init_calib, sparsity, stats=stats)
            flap_seconds = time.perf_counter() - t0
            table.mask("FLAP (no bias compensation)", sparsity, flap, flap_seconds)
            table.bias_compensated("FLAP + bias compensation (FLAP's own)", sparsity, flap, stats, flap_seconds)
            for name, options in variants.items():
                if options.get("granularity") == "channel":  # its PG-after-0-steps row
                    t0 = time.perf_counter()
                    ch_budget = Budget(space, "channel", equal_param_sparsity(space, sparsity, "channel"))
                    ch_theta, _, _ = initialise(ch_budget, "wanda-sp", model, init_calib)
                    table.mask("wanda-sp θ₀ channels only (all KV groups kept)", sparsity, ch_budget.final_mask(ch_theta),
                               time.perf_counter() - t0, "PG after 0 steps")
                config = PruneConfig(sparsity=equal_param_sparsity(space, sparsity, options.get("granularity", "")),
                                     steps=steps, **common.UNITS, **options,
                                     **({"lr": args.lr} if args.lr else {}),
                                     **({"engine": args.engine} if args.engine else {}))
                compensated = name == common.UNITS_DEFAULT_ROW or "channels only" in name
                common.pg_rows(table, name, sparsity, config, stats, compensated=compensated)

    meta = {"steps": steps, "eval_windows": eval_windows, "quick": args.quick, "lr": args.lr or defaults.lr,
            "threads": torch.get_num_threads(), "date": common.utc_now()}
    table.write(args.json, meta)


if __name__ == "__main__":
    main()
