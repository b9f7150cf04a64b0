"""Issue 18, item 4: which pieces of estimator hygiene help the allocation policy (the default)?

Part A, the gradient estimate (no steps taken): from the policy's start, on a few calibration
batches of the run's shape (2 x 128 tokens), each estimator's gradient of the smoothed loss in
the offsets is built from n masks, and its agreement with itself is measured: the mask draws are
split at random into two halves R times, and the correlation across the learned coordinates of
the two half estimates is averaged (the diagnostic `bpp prune` shows as `snr`; 0: noise, 1: the
data agree). Estimators:
- antithetic: n/2 pairs a +/- sigma*eps on the same batch, the pair's loss difference (the pair is
  its own baseline) -- what `bpp prune` does;
- independent + leave-one-out: n draws a + sigma*eps, each mask's loss minus the mean of the
  other n - 1 on the same batch;
each on the 8 smooth depth profiles (`--basis 8`, the default) and on free per-layer offsets
(`--basis 0`), each judged by the soft objective (the default) and by next-token NLL, on the same
masks.

Part B, whole runs (steps taken): `bpp prune --policy allocation` from the same start for T
channel steps (KV groups held, no incumbent, so the output is the deterministic mask; T = 45 is
the default run's number of channel steps) with Adam (the default), Adam with each coordinate's
update clipped to 2 lr, per-step normalised steps (`--optimizer sgd`: the gradient divided by
its RMS, so the step size does not follow the loss scale), and independent draws with a
leave-one-out baseline (`--sampling independent`). Each result is compacted with the seed's bias
compensation and evaluated on the held-out windows; paired bootstrap against the default and
against the start.

    python bench/estimators.py --sparsity 0.2 --seed 0 --json bench/results/estimators-20.json

The start is FLAP's mask (`--init flap`: seconds, where BESA takes minutes); the ranking is
FLAP's in every case.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import tempfile
import time
from pathlib import Path

import torch

import common

import bpp.search.optimizers as optimizers
from bpp.bias_compensation import BiasCompensation, InputStats
from bpp.masks import Masks
from bpp.methods import initialise
from bpp.methods.flap import flap_scores
from bpp.models.masked import MaskedModel
from bpp.search import MaskLosses, PruneConfig, SearchStart, calibration_batches, config_budget, new_policy
from bpp.search.estimators import offset_draws
from bpp.search.optimizers import Adam


def contributions(policy, sampling: str, n: int, losses_of, generator: torch.Generator) -> dict:
    """Draw n masks around the policy's centre, evaluate them (``losses_of(masks) -> {objective: (n,)}``)
    and return, per objective, the per-draw gradient contributions in the learned coordinates
    ``(draws, K)`` (their mean is the estimate) and the spread of what multiplies eps."""
    antithetic = sampling == "antithetic"
    eps = policy.draw_directions(n // 2 if antithetic else n, generator)
    masks, _ = policy.pair_masks(eps) if antithetic else policy.draw_masks(eps)
    out = {}
    for objective, losses in losses_of(masks).items():
        losses = losses.double()
        used, diffs, divisor = offset_draws(eps, losses, antithetic)  # the policy's own estimator
        weight = diffs / (divisor * policy.sigma)
        per_draw = weight.unsqueeze(-1) * used
        coeff = per_draw if policy.basis is None else per_draw @ policy.basis
        out[objective] = {"contributions": coeff, "weight_sd": float(weight.std() * policy.sigma),
                          "loss_sd": float(losses.std())}
    return out


def split_correlation(c: torch.Tensor, splits: int, generator: torch.Generator) -> float:
    """Mean over random halvings of the draws of the Pearson correlation, across coordinates, of the
    two half estimates."""
    n, vals = c.shape[0], []
    for _ in range(splits):
        perm = torch.randperm(n, generator=generator)
        a, b = c[perm[: n // 2]].mean(0), c[perm[n // 2: 2 * (n // 2)]].mean(0)
        a, b = a - a.mean(), b - b.mean()
        den = float(a.norm() * b.norm())
        if den > 0:
            vals.append(float((a * b).sum()) / den)
    return sum(vals) / len(vals)


def part_a(bench: common.QualityBench, args, start: dict, comp: BiasCompensation) -> None:
    engine = MaskedModel(bench.model)
    objectives = {o: MaskLosses(engine=engine, compensation=comp, objective=o) for o in ("soft", "nll")}
    config = PruneConfig(sparsity=args.sparsity, seed=args.seed).validate()
    batches = calibration_batches(bench.calib, config).view(-1, config.batch_size, config.seq_len)
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for b in range(args.batches):
        ids = batches[b]

        def losses_of(masks: Masks) -> dict:
            return {o: fn(ids, masks).detach().cpu() for o, fn in objectives.items()}

        for basis in (8, 0):
            policy = new_policy(bench.space, PruneConfig(sparsity=args.sparsity, seed=args.seed, init="flap",
                                                         basis=basis).validate(),
                                SearchStart(None, start["mask"], start["metrics"], start["ranks"]))
            for sampling in ("antithetic", "independent + leave-one-out"):
                t0 = time.perf_counter()
                res = contributions(policy, sampling, args.masks, losses_of, g)
                for objective, r in res.items():
                    row = {"batch": b, "coordinates": "8 smooth profiles" if basis else "per layer",
                           "sampling": sampling, "objective": objective, "masks": args.masks,
                           "half_correlation": split_correlation(r["contributions"], args.splits, g),
                           "weight_sd": r["weight_sd"], "loss_sd": r["loss_sd"],
                           "seconds": time.perf_counter() - t0}
                    rows.append(row)
                    print(f"  batch {b} {row['coordinates']:>17} {sampling:>28} {objective:>4}: "
                          f"half-correlation {row['half_correlation']:+.3f}, loss sd {row['loss_sd']:.4f}", flush=True)
                bench.results["gradient"] = rows
                bench.save()
    table = {}
    for r in rows:
        table.setdefault((r["coordinates"], r["sampling"], r["objective"]), []).append(r["half_correlation"])
    bench.results["gradient_summary"] = [
        {"coordinates": k[0], "sampling": k[1], "objective": k[2], "half_correlation_mean": sum(v) / len(v),
         "per_batch": v} for k, v in table.items()]
    bench.save()


class CountingAdam(Adam):
    """bpp's Adam with an optional clip of each coordinate's update to ``clip``·lr (the clipping the
    issue proposed), counting how often the clip binds (coordinates x steps)."""

    bound = 0
    coordinates = 0

    def __init__(self, n: int, clip: float | None = None):
        super().__init__(n)
        self.clip = clip

    def update(self, grad: torch.Tensor, lr: float) -> torch.Tensor:
        step = super().update(grad, lr)
        CountingAdam.coordinates += step.numel()
        if self.clip is not None:
            CountingAdam.bound += int((step.abs() > self.clip * lr).sum())
            step = step.clamp(-self.clip * lr, self.clip * lr)
        return step


VARIANTS = {  # name: (PruneConfig changes, Adam's clip)
    "adam (default)": ({}, None),
    "adam, update clipped to 2 lr": ({}, 2.0),
    "normalised steps (--optimizer sgd)": ({"optimizer": "sgd"}, None),
    "independent draws + leave-one-out (--sampling independent)": ({"sampling": "independent"}, None),
}


def part_b(bench: common.QualityBench, args, start: dict, comp: BiasCompensation) -> None:
    start_nll = bench.nll("start", start["mask"], comp)
    bench.results["start_window_nll"] = start_nll.tolist()
    results = {}
    names = list(VARIANTS) if not args.variants else [n for n in VARIANTS if any(v in n for v in args.variants.split(","))]
    for name in names:
        changes, clip = VARIANTS[name]
        optimizers.Adam = functools.partial(CountingAdam, clip=clip)
        CountingAdam.bound = CountingAdam.coordinates = 0
        try:
            config = PruneConfig(sparsity=args.sparsity, seed=args.seed, init="flap", steps=args.steps,
                                 group_every=0, incumbent_every=0, **changes)
            tmp = Path(tempfile.mkdtemp(prefix="bpp-bench-"))
            t0 = time.perf_counter()
            report = common.prune_run(config, bench.model, bench.tok, tmp / "run")
        finally:
            optimizers.Adam = Adam
        mask = Masks.load(tmp / "run" / "mask.safetensors")
        nll = bench.nll(name, mask, comp)
        results[name] = nll
        bench.results.setdefault("variants", []).append(
            {"variant": name, "steps": args.steps, "wall_seconds": time.perf_counter() - t0,
             "ppl": math.exp(float(nll.mean())), "window_nll": nll.tolist(), "adam_updates_clipped": [CountingAdam.bound, CountingAdam.coordinates],
             "snr": report.get("allocation", {}).get("snr"),
             "kept_channels_per_layer": report.get("allocation", {}).get("kept_channels_per_layer")})
        print(f"  {name}: held-out ppl {math.exp(float(nll.mean())):.3f}", flush=True)
        bench.compare("variant vs start", (name, nll), ("start (FLAP mask)", start_nll),
                      sparsity=args.sparsity, seed=args.seed)
    default = next(iter(VARIANTS))
    for name in results:
        if name != default and default in results:
            bench.compare("variant vs default", (name, results[name]), (default, results[default]),
                          sparsity=args.sparsity, seed=args.seed)


def replay(folders: list[str]) -> dict:
    """Adam's unclipped update size |m̂/√v̂| replayed on the channel-step gradients that allocation
    runs recorded in their metrics.jsonl: how often a clip at 2·lr would have bound."""
    runs = updates = bound = 0
    largest = 0.0
    for folder in folders:
        adam, runs = None, runs + 1
        if not (Path(folder) / "metrics.jsonl").is_file():
            raise SystemExit(f"{folder}: no metrics.jsonl (not a bpp prune run folder?)")
        for line in (Path(folder) / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind", "channel") != "channel" or rec.get("skipped") or "grad" not in rec:
                continue
            g = torch.tensor(rec["grad"], dtype=torch.float64)
            adam = adam or Adam(g.numel())
            ratio = adam.update(g, 1.0).abs()
            updates, bound, largest = updates + g.numel(), bound + int((ratio > 2).sum()), max(largest, float(ratio.max()))
    out = {"runs": runs, "coordinate_updates": updates, "above_2": bound, "largest": largest}
    print(f"  Adam replayed on {runs} runs: {updates} coordinate updates, largest |m/sqrt(v)| {largest:.3f}, "
          f"{bound} above 2", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--masks", type=int, default=48, help="masks per gradient estimate (part A)")
    ap.add_argument("--batches", type=int, default=3, help="calibration batches (part A)")
    ap.add_argument("--splits", type=int, default=200, help="random halvings per estimate (part A)")
    ap.add_argument("--steps", type=int, default=45, help="channel steps per variant (part B)")
    ap.add_argument("--parts", default="a,b")
    ap.add_argument("--variants", default="", help="part B: only the variants whose names contain one of these (comma-separated)")
    ap.add_argument("--eval-windows", type=int, default=None, help="held-out windows (default: all)")
    ap.add_argument("--json", default="bench/estimators.json")
    ap.add_argument("--replay", nargs="*", default=None, metavar="RUN",
                    help="only replay Adam on these allocation run folders' recorded gradients (no model)")
    args = ap.parse_args()
    if args.replay is not None:
        Path(args.json).write_text(json.dumps({"adam_replay": replay(args.replay)}, indent=1) + "\n")
        return
    if args.masks < 4 or args.masks % 2:
        ap.error("--masks must be even and at least 4")
    bench = common.QualityBench(args, PruneConfig())
    config = PruneConfig(sparsity=args.sparsity, seed=args.seed, init="flap").validate()
    with torch.no_grad():
        calib = bench.init_calib(args.seed)
        stats = InputStats(bench.model).collect(calib)
        comp = BiasCompensation.from_stats(bench.model, stats)
        _, mask, metrics = initialise(config_budget(bench.space, config), "flap", bench.model, calib)
        start = {"mask": mask, "metrics": metrics,
                 "ranks": dict(zip(("channel", "group"), flap_scores(bench.model, stats)))}
        parts = args.parts.split(",")
        if "a" in parts:
            part_a(bench, args, start, comp)
        if "b" in parts:
            part_b(bench, args, start, comp)
    bench.save()


if __name__ == "__main__":
    main()
