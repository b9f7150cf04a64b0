"""Which start `bpp prune --init auto` (the allocation policy's default) takes, per sparsity and
seed: each candidate's mask (BESA's, FLAP's) written as the run writes its output (reconstructed
by default), its perplexity on the run's held-in selection windows, the paired difference of the
per-window NLLs and its standard error, and the choice (the incumbent's rule: BESA's unless FLAP's
is lower by more than z standard errors). Only the choice runs: no search, no evaluation.

    OMP_NUM_THREADS=1 python bench/init_choice.py --sparsities 0.2,0.4 --seeds 0,1,2 --json OUT.json
    OMP_NUM_THREADS=1 python bench/init_choice.py --model gemma3-270m --sparsities 0.2 --seeds 1 --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import common


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="a model bpp loads (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--sparsities", default="0.2,0.4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from bpp.jobs.prune_steps import JOB_DEFAULTS, init_calibration, load_inputs
    from bpp.jobs.written import choose_start
    from bpp.modelio import load_model
    from bpp.search import PruneConfig
    from bpp.search.config import model_dtype

    model, tok = load_model(None if args.model == "default" else args.model, dtype=model_dtype(PruneConfig()))
    results = {"machine": common.machine_line(), "date": common.utc_now(), "model": args.model, "rows": []}
    print(results["machine"])
    print("| sparsity | seed | BESA's start | FLAP's start | FLAP − BESA (mean NLL) | standard error | chosen | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            config = PruneConfig(model=args.model, sparsity=sparsity, seed=seed).validate()
            t0 = time.perf_counter()
            inputs = load_inputs(config, {**JOB_DEFAULTS, "evaluate": False}, model, tok, None, 0, 1, None)
            calib = init_calibration(config, inputs)
            with torch.no_grad():  # written reconstructed (the default): the bias statistics are not needed
                chosen, _, choice = choose_start(config, inputs, calib)
            (challenge,) = choice["challenges"]
            ppl = choice["held_in_perplexity"]
            row = {"sparsity": sparsity, "seed": seed, **choice, "seconds": time.perf_counter() - t0}
            results["rows"].append(row)
            print(f"| {sparsity:.0%} | {seed} | {ppl['besa']:.3f} | {ppl['flap']:.3f} | "
                  f"{challenge['mean_difference']:+.4f} | {challenge['standard_error']:.4f} | {chosen} | "
                  f"{row['seconds']:.0f} |", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
