"""What the allocation policy's steps add: held-out perplexity (compacted with bias compensation,
paired bootstrap over windows) of its starting deterministic mask (0 evaluations: the init's
per-layer counts, FLAP's ranking inside layers) against the init mask, and of the run's output
against that start. Arguments: seed-0 `bpp prune` run folders (default options, any sparsity).

    python bench/allocation_start.py RUN [RUN ...] [--json bench/results/allocation-start.json]
"""
import argparse
import json
from pathlib import Path

import torch

import common
from bpp.bias_compensation import BiasCompensation, InputStats
from bpp.compaction import compact_model
from bpp.data import windows
from bpp.methods.flap import flap_scores
from bpp.search import PruneConfig, SearchStart, new_policy
from bpp.masks import Masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN", help="seed-0 `bpp prune` run folders")
    ap.add_argument("--json", default="bench/results/allocation-start.json")
    args = ap.parse_intermixed_args()

    default = common.load_default()
    model, space, held = default.model, default.space, default.held
    calib = windows(default.tok, default.calib, 256, 32, seed=0)
    res = []
    with torch.no_grad():
        stats = InputStats(model).collect(calib)
        comp = BiasCompensation.from_stats(model, stats)
        ch, gr = flap_scores(model, stats)

        def nll(mask):
            return common.window_nll(compact_model(model, mask, **comp.compact_biases(mask)), held)

        for run in args.runs:
            sp = json.loads(Path(run, "config.json").read_text())["sparsity"]
            cfg = PruneConfig(sparsity=sp).validate()
            init = Masks.load(f"{run}/init_mask.safetensors")
            final = Masks.load(f"{run}/mask.safetensors")
            pol = new_policy(space, cfg, SearchStart(None, init, {}, {"channel": ch, "group": gr}))
            start = pol.deterministic_mask()
            a, b, c = nll(start), nll(init), nll(final)
            r = {"sparsity": sp, "seed": 0, "params": [int(space.params(m)[0]) for m in (start, init, final)],
                 "start_vs_besa": common.paired_bootstrap(a, b), "final_vs_start": common.paired_bootstrap(c, a)}
            print(json.dumps(r), flush=True)
            res.append(r)
    Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
