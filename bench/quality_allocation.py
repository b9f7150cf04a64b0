"""Issue 18: does `bpp prune`'s default find better masks than FLAP + bias compensation and BESA +
bias compensation at the same parameter count, on the embedded default (SmolLM2-135M-Instruct)?

Every model is evaluated as it is written (compacted, with its FLAP output biases when bias
compensation is on), on the held-out part of the default text cut into windows of 128 tokens;
each comparison is a paired bootstrap over those windows (10,000 resamples): the mean
difference of the perplexities and its 95% interval (negative: the first is better).

    python bench/quality_allocation.py --sparsities 0.2,0.4 --seeds 0,1,2 --json bench/quality-allocation.json
    python bench/quality_allocation.py --inits wanda-sp,flap,besa --seeds 0 --json bench/quality-inits.json
    python bench/quality_allocation.py --efficiency 100,300,1000,3000 --seeds 0 --json bench/quality-efficiency.json

Parts (each optional, all into one JSON):
- default: per sparsity and seed, the default `bpp prune` run and the FLAP and BESA masks of the same
  seed's calibration windows (the windows `bpp prune` initialises from), all with bias compensation;
- --inits X,Y: `bpp prune --init X` against X's own mask (also compensated);
- --dtypes A,B: the default run with masks judged in dtype A and in B (one BESA start per seed),
  each written reconstructed, B against A;
- --efficiency N,...: the deterministic mask of `--policy units` (official settings, bias
  compensation on as for every row here, no incumbent) and of the default policy after N mask
  evaluations: snapshots of one run of max(N) evaluations per policy and seed.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import common
from bpp.bias_compensation import BiasCompensation, InputStats
from bpp.search import PruneConfig  # noqa: E402
from bpp.masks import Masks


class Refit:
    """The least-squares reconstruction as a compensation: ``compact_biases(mask)`` gives what
    ``compact_model`` takes, refit on ``calib`` (the seed's init windows, as the bias means)."""

    def __init__(self, model, calib):
        self.model, self.calib = model, calib

    def compact_biases(self, mask) -> dict:
        from bpp.reconstruction import reconstruct

        return reconstruct(self.model, mask, self.calib).compact_kwargs()


def part_default(bench: common.QualityBench, sparsity: float, seed: int, steps: int | None,
                 compensations: tuple[str, ...] = ("bias",), masks_dir: str | None = None):
    from bpp.methods.besa import besa_mask
    from bpp.methods.flap import flap_mask

    calib = bench.init_calib(seed)
    stats = InputStats(bench.model).collect(calib)
    comp = BiasCompensation.from_stats(bench.model, stats)
    t0 = time.perf_counter()
    flap = flap_mask(bench.model, calib, sparsity, stats=stats)
    flap_s = time.perf_counter() - t0
    config = PruneConfig(sparsity=sparsity, seed=seed, **({"steps": steps} if steps else {}))
    mask, report, out = bench.run(f"default s={sparsity} seed={seed}", config)
    if report["init"] == "besa":  # the run's init mask is BESA's own mask on these very windows
        besa, besa_s = Masks.load(out / "init_mask.safetensors"), report["timings_s"]["init"]
    else:
        t0 = time.perf_counter()
        besa = besa_mask(bench.model, bench.space, calib, sparsity)
        besa_s = time.perf_counter() - t0
    tag = f"s{sparsity}-seed{seed}"
    if masks_dir:
        Path(masks_dir).mkdir(parents=True, exist_ok=True)
        for name, m in (("default", mask), ("flap", flap), ("besa", besa)):
            m.save(Path(masks_dir) / f"{name}-{sparsity:g}-seed{seed}.safetensors")
    params = {"pg": int(bench.space.params(mask)[0]), "flap": int(bench.space.params(flap)[0]),
              "besa": int(bench.space.params(besa)[0])}
    for kind in compensations:
        c = comp if kind == "bias" else Refit(bench.model, calib)
        suffix = "" if kind == "bias" else f" {kind}"  # the bias rows keep their names of earlier runs
        pg = (f"bpp prune (default){suffix} {tag}", bench.nll(f"pg{suffix}-{tag}", mask, c))
        for name, m, secs in (("FLAP", flap, flap_s), ("BESA", besa, besa_s)):
            base = (f"{name} + {kind} {tag}", bench.nll(f"{name} + {kind}-{tag}", m, c))
            bench.compare("default vs baseline", pg, base, sparsity=sparsity, seed=seed, params=params,
                          baseline_seconds=secs, compensation=kind)


def part_inits(bench: common.QualityBench, sparsity: float, seed: int, inits: list[str], steps: int | None):
    comp = bench.compensation(seed)
    for init in inits:
        config = PruneConfig(sparsity=sparsity, seed=seed, init=init, **({"steps": steps} if steps else {}))
        mask, report, out = bench.run(f"--init {init} s={sparsity} seed={seed}", config)
        own = Masks.load(out / "init_mask.safetensors")
        tag = f"{init}-s{sparsity}-seed{seed}"
        bench.compare("--init X vs X's own mask", (f"bpp prune --init {init}", bench.nll(f"pg-{tag}", mask, comp)),
                      (f"{init} mask + bias", bench.nll(f"own-{tag}", own, comp)), sparsity=sparsity, seed=seed,
                      incumbent_changed_at=report.get("incumbent", {}).get("last_changed_at_step"))


def part_dtypes(bench: common.QualityBench, sparsity: float, seed: int, dtypes: list[str], steps: int | None):
    """The default run with its masks judged in each of ``dtypes`` (the first is the reference), from
    one BESA start per seed (the same windows give the same start), each final mask written as
    `bpp prune` writes it (reconstructed on the seed's init windows) and compared paired."""
    memo_besa(bench)
    calib = bench.init_calib(seed)
    rows = []
    for dtype in dtypes:
        config = PruneConfig(sparsity=sparsity, seed=seed, dtype=dtype, **({"steps": steps} if steps else {}))
        mask, report, _ = bench.run(f"default --dtype {dtype} s={sparsity} seed={seed}", config)
        rows.append((f"default --dtype {dtype} s{sparsity}-seed{seed}",
                     bench.nll(f"dtype-{dtype}-s{sparsity}-seed{seed}", mask, Refit(bench.model, calib))))
    for row in rows[1:]:
        bench.compare("mask judges", row, rows[0], sparsity=sparsity, seed=seed)


def memo_besa(bench: common.QualityBench) -> None:
    """Compute besa_allocate once per (windows, keep rate) in this process."""
    import bpp.methods.besa as besa

    if getattr(besa.besa_allocate, "memo", None) is not None:
        return
    compute, memo = besa.besa_allocate, {}

    def cached(model, space, calib, keep, granularity=("channel", "group"), config=None):
        key = (calib.numpy().tobytes(), float(keep), tuple(granularity))
        if key not in memo:
            memo[key] = compute(model, space, calib, keep, granularity, config)
        return memo[key]

    cached.memo = memo
    besa.besa_allocate = cached


def efficiency_plan(text: str) -> dict[str, list[int]]:
    """``"100,300,1000"`` (both policies) or ``"allocation:100,300,500;units:100,300,1000,3000"``."""
    if ":" not in text:
        return {p: [int(x) for x in text.split(",")] for p in ("units", "allocation")}
    return {p: [int(x) for x in b.split(",")] for p, b in (part.split(":") for part in text.split(";"))}


def part_efficiency(bench: common.QualityBench, sparsity: float, seed: int, plan: dict[str, list[int]]):
    comp = bench.compensation(seed)
    for policy, budgets in plan.items():
        samples = PruneConfig().samples
        steps = math.ceil(max(budgets) / samples)
        extra = {"incumbent_every": 0} if policy == "units" else {}
        config = PruneConfig(sparsity=sparsity, seed=seed, policy=policy, steps=steps, **extra)
        _, _, out = bench.run(f"efficiency {policy} s={sparsity} seed={seed}", config, snapshots=tuple(budgets))
        for n in budgets:
            snap = Masks.load(out / f"snapshot_{n}.safetensors")
            nll = bench.nll(f"eff-{policy}-{n}-{seed}", snap, comp)
            bench.results.setdefault("efficiency", []).append(
                {"policy": policy, "evaluations": n, "sparsity": sparsity, "seed": seed,
                 "ppl": math.exp(float(nll.mean())), "steps_of_run": steps, "window_nll": nll.tolist()})
            print(f"  {policy} after {n} evaluations: ppl {math.exp(float(nll.mean())):.3f}", flush=True)
        bench.save()
    if {"units", "allocation"} <= set(plan):  # the issue's test: the default with ≤ a quarter of units' top budget
        top = max(plan["units"])
        units = (f"units after {top} evaluations", bench.nll_cache[f"eff-units-{top}-{seed}"])
        for n in sorted(plan["allocation"]):
            if n <= top // 4:
                bench.compare("efficiency: default with <= 1/4 of the evaluations vs units",
                              (f"default after {n} evaluations", bench.nll_cache[f"eff-allocation-{n}-{seed}"]),
                              units, sparsity=sparsity, seed=seed)


def use_besa_cache(folder: Path, bench: common.QualityBench) -> None:
    """Serve besa_allocate from results computed earlier on the same windows (same seed, same sparsity)."""
    import bpp.methods.besa as besa

    compute = besa.besa_allocate

    def cached(model, space, calib, keep, granularity=("channel", "group"), config=None):
        for path in sorted(folder.glob("s*_seed*.pt")):
            c = torch.load(path, weights_only=False)
            if "besa_masks" in c and abs(c["sparsity"] - (1 - keep)) < 1e-9 and \
                    torch.equal(calib, bench.init_calib(c["seed"])):
                bench.results["meta"].setdefault("besa_from_cache", []).append(
                    {"file": str(path), "seconds_when_computed": c["t_besa"]})
                L = space.n_layers
                return besa.BesaResult(c["besa_masks"], c["besa_scores"], c["besa_keep_rates"], c["besa_keep_rates"],
                                       torch.ones(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64))
        return compute(model, space, calib, keep, granularity, config)

    besa.besa_allocate = cached


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model bpp loads (default: the embedded SmolLM2-135M-Instruct; "
                    "e.g. gemma3-270m)")
    ap.add_argument("--sparsities", default="0.2,0.4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=None, help="override the default run's steps")
    ap.add_argument("--no-default", action="store_true", help="skip the default-vs-baselines part")
    ap.add_argument("--inits", default="", help="comma-separated inits for the --init X part")
    ap.add_argument("--efficiency", default="", help="evaluation budgets for the efficiency part: N,N,... for both policies, or "
                         "policy:N,N;policy:N,... (e.g. allocation:100,300,500;units:100,300,1000,3000)")
    ap.add_argument("--dtypes", default="", help="the default run with masks judged in each of these --dtype values "
                    "(e.g. float32,auto: the first is the reference), one BESA start per seed, written reconstructed")
    ap.add_argument("--eval-windows", type=int, default=None, help="held-out windows (default: all)")
    ap.add_argument("--compensations", default="bias", help="how every mask of the default part is compacted: "
                    "bias, reconstruct, or both (bias,reconstruct)")
    ap.add_argument("--masks-dir", default=None, help="also save the default part's masks here")
    ap.add_argument("--json", default="bench/quality-allocation.json")
    ap.add_argument("--besa-cache", default=None,
                    help="folder of s<sparsity>_seed<seed>.pt files holding BESA results already computed on the same "
                         "calibration windows (BESA takes an hour on a shared 2-core machine); used when present")
    args = ap.parse_args()
    bench = common.QualityBench(args, PruneConfig())
    if args.besa_cache:
        use_besa_cache(Path(args.besa_cache), bench)
    seeds = [int(s) for s in args.seeds.split(",")]
    with torch.no_grad():
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            for seed in seeds:
                if not args.no_default:
                    part_default(bench, sparsity, seed, args.steps, tuple(args.compensations.split(",")),
                                 args.masks_dir)
                if args.inits:
                    part_inits(bench, sparsity, seed, args.inits.split(","), args.steps)
                if args.efficiency:
                    part_efficiency(bench, sparsity, seed, efficiency_plan(args.efficiency))
                if args.dtypes:
                    part_dtypes(bench, sparsity, seed, args.dtypes.split(","), args.steps)
    bench.save()


if __name__ == "__main__":
    main()
