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
- --efficiency N,...: the deterministic mask of `--policy units` (official settings, bias
  compensation on as for every row here, no incumbent) and of the default policy after N mask
  evaluations: snapshots of one run of max(N) evaluations per policy and seed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from bpp import load_model  # noqa: E402
from bpp.compaction import compact_model  # noqa: E402
from bpp.bias_compensation import BiasCompensation, InputStats  # noqa: E402
from bpp.data import load_text, tokenize, windows  # noqa: E402
from bpp.jobs.prune import prune  # noqa: E402
from bpp.policy_gradient import PruneConfig  # noqa: E402
from bpp.masks import Masks  # noqa: E402
from bpp.space import MaskSpace  # noqa: E402


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, seq_len: int = 128, max_windows: int | None = None,
               batch_size: int = 8) -> torch.Tensor:
    """(n,) float64 mean next-token NLL of each non-overlapping window (the perplexity protocol)."""
    n = ids.numel() // seq_len
    n = min(n, max_windows) if max_windows else n
    data = ids[: n * seq_len].view(n, seq_len)
    out = []
    for start in range(0, n, batch_size):
        batch = data[start:start + batch_size]
        logits = model(batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        out.append(nll.double().mean(1))
    return torch.cat(out)


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, n: int = 10_000, seed: int = 0) -> dict:
    """ppl(a) − ppl(b) over windows resampled together: mean, 95% interval, P(a worse)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, a.numel(), (n, a.numel()), generator=g)
    diff = torch.exp(a[idx].mean(1)) - torch.exp(b[idx].mean(1))
    lo, hi = torch.quantile(diff, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"ppl_a": math.exp(float(a.mean())), "ppl_b": math.exp(float(b.mean())),
            "mean_difference": math.exp(float(a.mean())) - math.exp(float(b.mean())),
            "ci95": [lo, hi], "p_a_not_better": float((diff >= 0).double().mean())}


class Bench:
    def __init__(self, args):
        self.args = args
        self.model, self.tok = load_model()
        self.space = MaskSpace.from_model(self.model)
        self.calib = tokenize(self.tok, load_text("default", "calib"))
        self.held = tokenize(self.tok, load_text("default", "heldout"))
        self.results = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                 "threads": torch.get_num_threads(), "eval_windows": args.eval_windows,
                                 "command": " ".join(sys.argv)}, "runs": [], "comparisons": []}
        self.nll_cache: dict[str, torch.Tensor] = {}
        self.run_cache: dict[str, tuple] = {}  # one run per configuration (the default run is also --init besa)

    def save(self):
        Path(self.args.json).write_text(json.dumps(self.results, indent=1) + "\n")

    def nll(self, key: str, mask: Masks, comp: BiasCompensation | None) -> torch.Tensor:
        if key not in self.nll_cache:
            extra = comp.compact_biases(mask) if comp is not None else {}
            small = compact_model(self.model, mask, **extra)
            self.nll_cache[key] = window_nll(small, self.held, max_windows=self.args.eval_windows)
        return self.nll_cache[key]

    def init_calib(self, seed: int) -> torch.Tensor:
        d = PruneConfig()
        return windows(self.tok, self.calib, d.init_seq_len, d.init_windows, seed=seed)

    def compensation(self, seed: int) -> BiasCompensation:
        return BiasCompensation.collect(self.model, self.init_calib(seed))

    def run(self, name: str, config: PruneConfig, snapshots=()) -> tuple[Masks, dict, Path]:
        key = json.dumps(config.validate().to_dict(), sort_keys=True) + str(snapshots)
        if key in self.run_cache:
            return self.run_cache[key]
        tmp = Path(tempfile.mkdtemp(prefix="bpp-bench-"))
        t0 = time.perf_counter()
        report = prune(config, tmp / "run", model=self.model, tokenizer=self.tok, evaluate=False, progress=False,
                       compact=False, checkpoint_every=0, snapshots=snapshots)
        wall = time.perf_counter() - t0
        mask = Masks.load(tmp / "run" / "mask.safetensors")
        self.results["runs"].append({"name": name, "config": config.to_dict(), "wall_seconds": wall,
                                     "timings_s": report["timings_s"], "params": int(self.space.params(mask)[0]),
                                     "incumbent": {k: v for k, v in report.get("incumbent", {}).items()
                                                   if k != "history"},
                                     "allocation": report.get("allocation")})
        print(f"{name}: {wall:.0f}s, {int(self.space.params(mask)[0]):,} params", flush=True)
        self.run_cache[key] = (mask, report, tmp / "run")
        self.save()
        return self.run_cache[key]

    def compare(self, what: str, a: tuple[str, torch.Tensor], b: tuple[str, torch.Tensor], **extra):
        rec = {"what": what, "a": a[0], "b": b[0], **paired_bootstrap(a[1], b[1]), **extra}
        self.results["comparisons"].append(rec)
        print(f"  {a[0]} vs {b[0]}: {rec['ppl_a']:.3f} vs {rec['ppl_b']:.3f}, diff {rec['mean_difference']:+.3f} "
              f"[{rec['ci95'][0]:+.3f}, {rec['ci95'][1]:+.3f}]", flush=True)
        self.save()


def part_default(bench: Bench, sparsity: float, seed: int, steps: int | None):
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
    if config.init == "besa":  # the run's init mask is BESA's own mask on these very windows
        besa, besa_s = Masks.load(out / "init_mask.safetensors"), report["timings_s"]["init"]
    else:
        t0 = time.perf_counter()
        besa = besa_mask(bench.model, bench.space, calib, sparsity)
        besa_s = time.perf_counter() - t0
    tag = f"s{sparsity}-seed{seed}"
    pg = (f"bpp prune (default) {tag}", bench.nll(f"pg-{tag}", mask, comp))
    params = {"pg": int(bench.space.params(mask)[0]), "flap": int(bench.space.params(flap)[0]),
              "besa": int(bench.space.params(besa)[0])}
    for name, m, secs in (("FLAP + bias", flap, flap_s), ("BESA + bias", besa, besa_s)):
        base = (f"{name} {tag}", bench.nll(f"{name}-{tag}", m, comp))
        bench.compare("default vs baseline", pg, base, sparsity=sparsity, seed=seed, params=params,
                      baseline_seconds=secs)


def part_inits(bench: Bench, sparsity: float, seed: int, inits: list[str], steps: int | None):
    comp = bench.compensation(seed)
    for init in inits:
        config = PruneConfig(sparsity=sparsity, seed=seed, init=init, **({"steps": steps} if steps else {}))
        mask, report, out = bench.run(f"--init {init} s={sparsity} seed={seed}", config)
        own = Masks.load(out / "init_mask.safetensors")
        tag = f"{init}-s{sparsity}-seed{seed}"
        bench.compare("--init X vs X's own mask", (f"bpp prune --init {init}", bench.nll(f"pg-{tag}", mask, comp)),
                      (f"{init} mask + bias", bench.nll(f"own-{tag}", own, comp)), sparsity=sparsity, seed=seed,
                      incumbent_changed_at=report.get("incumbent", {}).get("last_changed_at_step"))


def efficiency_plan(text: str) -> dict[str, list[int]]:
    """``"100,300,1000"`` (both policies) or ``"allocation:100,300,500;units:100,300,1000,3000"``."""
    if ":" not in text:
        return {p: [int(x) for x in text.split(",")] for p in ("units", "allocation")}
    return {p: [int(x) for x in b.split(",")] for p, b in (part.split(":") for part in text.split(";"))}


def part_efficiency(bench: Bench, sparsity: float, seed: int, plan: dict[str, list[int]]):
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


def use_besa_cache(folder: Path, bench: Bench) -> None:
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
    ap.add_argument("--sparsities", default="0.2,0.4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=None, help="override the default run's steps")
    ap.add_argument("--no-default", action="store_true", help="skip the default-vs-baselines part")
    ap.add_argument("--inits", default="", help="comma-separated inits for the --init X part")
    ap.add_argument("--efficiency", default="", help="evaluation budgets for the efficiency part: N,N,... for both policies, or "
                         "policy:N,N;policy:N,... (e.g. allocation:100,300,500;units:100,300,1000,3000)")
    ap.add_argument("--eval-windows", type=int, default=None, help="held-out windows (default: all)")
    ap.add_argument("--json", default="bench/quality-allocation.json")
    ap.add_argument("--besa-cache", default=None,
                    help="folder of s<sparsity>_seed<seed>.pt files holding BESA results already computed on the same "
                         "calibration windows (BESA takes an hour on a shared 2-core machine); used when present")
    args = ap.parse_args()
    bench = Bench(args)
    if args.besa_cache:
        use_besa_cache(Path(args.besa_cache), bench)
    seeds = [int(s) for s in args.seeds.split(",")]
    with torch.no_grad():
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            for seed in seeds:
                if not args.no_default:
                    part_default(bench, sparsity, seed, args.steps)
                if args.inits:
                    part_inits(bench, sparsity, seed, args.inits.split(","), args.steps)
                if args.efficiency:
                    part_efficiency(bench, sparsity, seed, efficiency_plan(args.efficiency))
    bench.save()


if __name__ == "__main__":
    main()
