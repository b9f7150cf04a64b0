"""What the allocation policy's steps add: held-out perplexity (compacted with bias compensation,
paired bootstrap over windows) of its starting deterministic mask (0 evaluations: the init's
per-layer counts, FLAP's ranking inside layers) against the init mask, and of the run's output
against that start. Arguments: seed-0 `bpp prune` run folders (default options, any sparsity).

    python bench/allocation_start.py RUN [RUN ...] [--json bench/results/allocation-start.json]
"""
import sys, json, math
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
import quality_allocation as Q
from bpp import load_model
from bpp.allocation_loop import build_policy
from bpp.bias_compensation import BiasCompensation, InputStats
from bpp.compaction import compact_model
from bpp.data import load_text, tokenize, windows
from bpp.methods.flap import flap_scores
from bpp.policy_gradient import PruneConfig
from bpp.masks import Masks
from bpp.space import MaskSpace
model, tok = load_model()
space = MaskSpace.from_model(model)
held = tokenize(tok, load_text("default", "heldout"))
calib = windows(tok, tokenize(tok, load_text("default", "calib")), 256, 32, seed=0)
args = [a for a in sys.argv[1:]]
out = "bench/results/allocation-start.json"
if "--json" in args:
    i = args.index("--json"); out = args[i + 1]; del args[i:i + 2]
runs = args
res = []
with torch.no_grad():
    stats = InputStats(model).collect(calib)
    comp = BiasCompensation.from_stats(model, stats)
    ch, gr = flap_scores(model, stats)
    def nll(mask):
        return Q.window_nll(compact_model(model, mask, **comp.compact_biases(mask)), held)
    for run in runs:
        sp = json.loads(Path(run, "config.json").read_text())["sparsity"]
        cfg = PruneConfig(sparsity=sp).validate()
        init = Masks.load(f"{run}/init_mask.safetensors"); final = Masks.load(f"{run}/mask.safetensors")
        pol = build_policy(space, cfg, init, {}, {"channel": ch, "group": gr})
        start = pol.center_mask()
        a, b, c = nll(start), nll(init), nll(final)
        r = {"sparsity": sp, "seed": 0, "params": [int(space.params(m)[0]) for m in (start, init, final)],
             "start_vs_besa": Q.paired_bootstrap(a, b), "final_vs_start": Q.paired_bootstrap(c, a)}
        print(json.dumps(r), flush=True); res.append(r)
Path(out).write_text(json.dumps(res, indent=1) + "\n")
