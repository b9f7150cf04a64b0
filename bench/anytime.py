"""Held-out perplexity against the number of mask evaluations: does a longer search buy a better
mask? The default search (``--policy allocation``) and the evolutionary baseline
(``--policy evopress``) on the same axes, with the same start (BESA's counts, FLAP's ranking),
the same fitness (soft loss, bias compensation) and the same budget.

    # one process per policy (one core each), then the table and the plot from both files
    OMP_NUM_THREADS=1 python bench/anytime.py run --policy allocation --sparsity 0.4 --budgets 100,300,480,1000,3000 --json A.json
    OMP_NUM_THREADS=1 python bench/anytime.py run --policy evopress --sparsity 0.4 --budgets 100,300,480,1000,3000 --json E.json
    python bench/anytime.py add --json A.json --evaluations 480 --mask RUN/mask.safetensors   # a point made elsewhere
    python bench/anytime.py table A.json E.json --plot bench/results/anytime-40.png

What a point is: for ``allocation``, the output (the incumbent) of a separate run asked for N
evaluations (``--evaluations N``: its rounds and learning-rate schedule are sized to N); for
``evopress``, the parent after N evaluations of one run of the largest N (the evolutionary search
has no schedule, so a run asked for N would stop at that very parent). Each mask is compacted with
the seed's FLAP bias compensation (what the search judged masks with) and evaluated on the
held-out windows of the default text; comparisons are paired bootstraps over those windows.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import common


def memoise_besa() -> None:
    """BESA's allocation computed once per process for each (sparsity, calibration windows)."""
    import bpp.methods.besa as besa

    compute, memo = besa.besa_allocate, {}

    def cached(model, space, calib, keep, granularity=("channel", "group"), config=None):
        key = (round(keep, 9), tuple(calib.shape), int(calib.sum()), tuple(granularity))
        if key not in memo:
            memo[key] = compute(model, space, calib, keep, granularity, config)
        return memo[key]

    besa.besa_allocate = cached


def run(args) -> None:
    from bpp.masks import Masks
    from bpp.search import PruneConfig

    memoise_besa()
    bench = common.QualityBench(args, PruneConfig())
    comp = bench.compensation(args.seed)
    budgets = [int(b) for b in args.budgets.split(",")]  # allocation: run in this order
    out = bench.results
    out["meta"].update(policy=args.policy, sparsity=args.sparsity, seed=args.seed, budgets=budgets,
                       machine=common.machine_line())
    out["points"] = []

    def point(n: int, mask, report, seconds: float) -> None:
        nll = bench.nll(f"{args.policy}-{n}", mask, comp)
        out["points"].append({"evaluations": n, "evaluations_done": report.get("evaluations"),
                              "ppl": math.exp(float(nll.mean())), "window_nll": nll.tolist(),
                              "params": int(bench.space.params(mask)[0]), "seconds": seconds})
        print(f"{args.policy} {n}: ppl {out['points'][-1]['ppl']:.3f} ({seconds:.0f} s)", flush=True)
        bench.save()

    with torch.no_grad():
        if args.policy == "allocation":
            for n in budgets:
                config = PruneConfig(sparsity=args.sparsity, seed=args.seed, evaluations=n, policy="allocation")
                t0 = time.perf_counter()
                mask, report, _ = bench.run(f"allocation {n}", config)
                point(n, mask, report, time.perf_counter() - t0)
        else:
            config = PruneConfig(sparsity=args.sparsity, seed=args.seed, evaluations=max(budgets), policy=args.policy)
            t0 = time.perf_counter()
            _, report, folder = bench.run(f"{args.policy} {max(budgets)}", config, snapshots=tuple(budgets))
            seconds = time.perf_counter() - t0
            for n in sorted(budgets):
                snap = folder / f"snapshot_{n}.safetensors"
                if not snap.is_file():
                    raise SystemExit(f"{args.policy}: no snapshot at {n} evaluations in {folder}")
                point(n, Masks.load(snap), {"evaluations": n}, seconds * n / max(budgets))
    bench.save()


def add(args) -> None:
    """A point from a mask made elsewhere (e.g. the default run of bench/quality_allocation.py, the
    same configuration as ``--evaluations 480``), evaluated as ``run`` evaluates its points."""
    from bpp.masks import Masks
    from bpp.search import PruneConfig

    path = Path(args.json)
    out = json.loads(path.read_text())
    bench = common.QualityBench(argparse.Namespace(json=str(path) + ".tmp", eval_windows=args.eval_windows),
                                PruneConfig())
    mask = Masks.load(args.mask)
    nll = bench.nll("added", mask, bench.compensation(out["meta"]["seed"]))
    out["points"] = [p for p in out["points"] if p["evaluations"] != args.evaluations] + [
        {"evaluations": args.evaluations, "ppl": math.exp(float(nll.mean())), "window_nll": nll.tolist(),
         "params": int(bench.space.params(mask)[0]), "mask_file": args.mask}]
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{args.evaluations}: ppl {out['points'][-1]['ppl']:.3f}")


def table(args) -> None:
    runs = [json.loads(Path(p).read_text()) for p in args.files]
    by_policy = {r["meta"]["policy"]: {p["evaluations"]: p for p in r["points"]} for r in runs}
    nll = lambda p: torch.tensor(p["window_nll"], dtype=torch.float64)  # noqa: E731
    budgets = sorted({n for pts in by_policy.values() for n in pts})
    policies = list(by_policy)
    lines = [f"Sparsity {runs[0]['meta']['sparsity']:g}, seed {runs[0]['meta']['seed']}; "
             f"{runs[0]['meta'].get('machine', '')}", ""]
    head = "| mask evaluations | " + " | ".join(policies) + " | " + " − ".join(policies[:2]) + " [95% CI] |"
    lines += [head, "|" + "---|" * (len(policies) + 2)]
    comparisons = []
    for n in budgets:
        row = [f"{by_policy[p][n]['ppl']:.2f}" if n in by_policy[p] else "" for p in policies]
        diff = ""
        if len(policies) >= 2 and all(n in by_policy[p] for p in policies[:2]):
            c = common.paired_bootstrap(nll(by_policy[policies[0]][n]), nll(by_policy[policies[1]][n]))
            comparisons.append({"what": f"{policies[0]} vs {policies[1]}", "evaluations": n, **c})
            diff = f"{c['mean_difference']:+.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]"
        lines.append(f"| {n:,} | " + " | ".join(row) + f" | {diff} |")
    lines += ["", "| policy | from → to | difference [95% CI] | ratio |", "|---|---|---|---|"]
    for p in policies:
        pts = by_policy[p]
        ns = sorted(pts)
        for a, b in zip(ns, ns[1:]):
            c = common.paired_bootstrap(nll(pts[b]), nll(pts[a]))
            comparisons.append({"what": f"{p}: {b} vs {a}", **c})
            lines.append(f"| {p} | {a:,} → {b:,} | {c['mean_difference']:+.2f} [{c['ci95'][0]:+.2f}, "
                         f"{c['ci95'][1]:+.2f}] | {pts[b]['ppl'] / pts[a]['ppl']:.3f} |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"files": args.files, "comparisons": comparisons}, indent=1) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for p in policies:
            ns = sorted(by_policy[p])
            ax.plot(ns, [by_policy[p][n]["ppl"] for n in ns], marker="o", label=p)
        ax.set_xscale("log")
        ax.set_xlabel("mask evaluations")
        ax.set_ylabel("held-out perplexity (bias compensation)")
        ax.set_title(f"SmolLM2-135M at {runs[0]['meta']['sparsity']:g} sparsity, seed {runs[0]['meta']['seed']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="one policy's points")
    r.add_argument("--policy", default="allocation")
    r.add_argument("--sparsity", type=float, default=0.4)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--budgets", default="3000,300,100,1000", help="evaluation budgets (allocation: one run each, in this order)")
    r.add_argument("--eval-windows", type=int, default=None, help="held-out windows (default: all 85)")
    r.add_argument("--json", required=True)
    a = sub.add_parser("add", help="a point from a mask made elsewhere, into a run file")
    a.add_argument("--json", required=True)
    a.add_argument("--mask", required=True)
    a.add_argument("--evaluations", type=int, required=True)
    a.add_argument("--eval-windows", type=int, default=None)
    t = sub.add_parser("table", help="the table and plot from run files")
    t.add_argument("files", nargs="+")
    t.add_argument("--plot", default=None)
    t.add_argument("--json", default=None, help="write the comparisons here")
    args = ap.parse_args()
    {"run": run, "add": add, "table": table}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
