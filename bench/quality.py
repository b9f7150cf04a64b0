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
- with --companions: the rows of bench/quality_companions.py (LoRAPrune, BESA, Pangu Light
  re-initialisation, LoRA recovery), at the same parameter count.
- PG variants of `--policy units` (no bias compensation in the loss, no incumbent; the default
  allocation policy is measured by bench/quality_allocation.py): S=2 moving average (the
  official setting), S=8 moving average (the units policy's default),
  S=8 leave-one-out baseline, S=8 with the joint parameter budget. Same steps and batches for all,
  so S=2 does a quarter of the forward work.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bpp import load_model  # noqa: E402
from bpp.data import load_text, tokenize, windows  # noqa: E402
from bpp.compaction import compact_model  # noqa: E402
from bpp.methods.flap import compensation_biases  # noqa: E402
from bpp.evaluation import masked_perplexity  # noqa: E402
from bpp.jobs.prune import prune  # noqa: E402
from bpp.policy_gradient import PruneConfig  # noqa: E402
from bpp.evaluation import perplexity  # noqa: E402
from bpp.methods import initialise, prior_mask  # noqa: E402
from bpp.policy import Policy  # noqa: E402
from bpp.space import MaskSpace  # noqa: E402

# the per-unit policy as it was measured here before the allocation policy became the default
# (issue 18; its table: bench/quality_allocation.py): no bias compensation in the loss, no incumbent
UNITS = dict(policy="units", bias_compensation=False, incumbent_every=0)
PG_VARIANTS = {
    "PG S=2 moving-avg (official)": dict(samples=2, baseline="moving-average"),
    "PG S=8 moving-avg (units default)": dict(samples=8, baseline="moving-average"),
    "PG S=8 leave-one-out": dict(samples=8, baseline="leave-one-out"),
    "PG S=8 --budget params": dict(samples=8, budget="params"),
    # every KV group kept, the whole parameter cut taken from MLP channels (the allocation BESA and
    # FLAP find on SmolLM2): --granularity channel at the channel sparsity of equal parameters
    "PG S=8 channels only (all KV groups kept)": dict(samples=8, granularity="channel"),
}


def pg_mask(model, tok, config: PruneConfig):
    """``bpp prune``'s final mask for ``config`` (no evaluation, no compaction) and its report."""
    from bpp.masks import Masks

    with tempfile.TemporaryDirectory() as tmp:
        report = prune(config, Path(tmp) / "run", model=model, tokenizer=tok, evaluate=False,
                       progress=False, compact=False, checkpoint_every=0)
        return Masks.load(Path(tmp) / "run" / "mask.safetensors"), report


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
    ap.add_argument("--companions", action="store_true",
                    help="also the companion methods (LoRAPrune, BESA, Pangu Light, recovery): bench/quality_companions.py")
    args = ap.parse_args()

    defaults = PruneConfig(**UNITS).validate()
    steps = args.steps or (30 if args.quick else defaults.steps)
    eval_windows = args.eval_windows or (40 if args.quick else None)
    variants = {k: v for k, v in PG_VARIANTS.items()
                if not args.variants or any(s.strip() in k for s in args.variants.split(","))}
    model, tok = load_model()
    space = MaskSpace.from_model(model)
    calib_ids = tokenize(tok, load_text("default", "calib"))
    held = tokenize(tok, load_text("default", "heldout"))
    init_calib = windows(tok, calib_ids, defaults.init_seq_len, defaults.init_windows, seed=defaults.seed)
    ppl = lambda mask: masked_perplexity(model, tok, held, mask, 128, eval_windows)  # noqa: E731

    rows = []

    def add(method, sparsity, mask, seconds, note=""):
        t0 = time.perf_counter()
        value = ppl(mask)
        params = int(space.params(mask)[0]) if mask is not None else space.total_params
        rows.append(dict(method=method, sparsity=sparsity, params=params, ppl=value,
                         seconds=seconds, eval_seconds=time.perf_counter() - t0, note=note))
        print(f"{method:<34} s={sparsity:<4} params {params / 1e6:7.2f}M  ppl {value:9.3f}  "
              f"({seconds:.0f}s){'  ' + note if note else ''}", flush=True)

    def add_compacted(method, sparsity, mask, stats, seconds, note=""):
        """A mask compacted with FLAP-style bias compensation, evaluated as the compacted model."""
        attn_bias, mlp_bias = compensation_biases(model, mask, stats)
        small = compact_model(model, mask, o_proj_bias=attn_bias, down_proj_bias=mlp_bias)
        add_model(method, sparsity, small, int(space.params(mask)[0]), seconds, note)

    def add_model(method, sparsity, small, params, seconds, note=""):
        """A row for an already-built (compacted) model."""
        t0 = time.perf_counter()
        value = perplexity(small, tok, held, seq_len=128, max_windows=eval_windows)
        rows.append(dict(method=method, sparsity=sparsity, params=params, ppl=value,
                         seconds=seconds, eval_seconds=time.perf_counter() - t0, note=note))
        print(f"{method:<34} s={sparsity:<4} params {params / 1e6:7.2f}M  ppl {value:9.3f}  "
              f"({seconds:.0f}s){'  ' + note if note else ''}", flush=True)

    add.model, add.compacted = add_model, add_compacted
    with torch.no_grad():
        add("dense", 0.0, None, 0.0)
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            t0 = time.perf_counter()
            add("magnitude (layer-uniform)", sparsity, prior_mask(model, space, "magnitude", sparsity),
                time.perf_counter() - t0)
            t0 = time.perf_counter()
            policy = Policy(space, "group,channel", sparsity)
            _, wanda_mask, _ = initialise(policy, "wanda-sp", model, init_calib)
            init_seconds = time.perf_counter() - t0
            add("wanda-sp (layer-uniform)", sparsity, wanda_mask, init_seconds)
            add("wanda-sp θ₀ (global top-k)", sparsity, policy.final_mask(), init_seconds, "PG after 0 steps")
            from bpp.bias_compensation import InputStats
            from bpp.methods.flap import flap_mask

            pg_masks = {}
            t0 = time.perf_counter()
            stats = InputStats(model).collect(init_calib)
            flap = flap_mask(model, init_calib, sparsity, stats=stats)
            flap_seconds = time.perf_counter() - t0
            add("FLAP (no bias compensation)", sparsity, flap, flap_seconds)
            add_compacted("FLAP + bias compensation (FLAP's own)", sparsity, flap, stats, flap_seconds)
            for name, options in variants.items():
                if options.get("granularity") == "channel":  # its PG-after-0-steps row
                    t0 = time.perf_counter()
                    ch_policy = Policy(space, "channel", equal_param_sparsity(space, sparsity, "channel"))
                    initialise(ch_policy, "wanda-sp", model, init_calib)
                    add("wanda-sp θ₀ channels only (all KV groups kept)", sparsity, ch_policy.final_mask(),
                        time.perf_counter() - t0, "PG after 0 steps")
                config = PruneConfig(sparsity=equal_param_sparsity(space, sparsity, options.get("granularity", "")),
                                     steps=steps, **UNITS, **options,
                                     **({"lr": args.lr} if args.lr else {}),
                                     **({"engine": args.engine} if args.engine else {}))
                mask, report = pg_mask(model, tok, config)
                t = report["timings_s"]
                add(name, sparsity, mask, t["init"] + t["policy_gradient"],
                    f"{steps} steps, {t['per_step']:.1f}s/step, {report['losses_backend']}")
                pg_masks[name] = mask
                if ("(units default)" in name or "channels only" in name) and flap_mask is not None:
                    add_compacted(name + " + bias compensation", sparsity, mask, stats,
                                  t["init"] + t["policy_gradient"], "`bpp compact --bias-compensation`")
            if args.companions:
                from quality_companions import companion_rows

                companion_rows(model, tok, space, sparsity, init_calib, held, add, pg_masks,
                               steps=steps, eval_windows=eval_windows, stats=stats if flap_mask is not None else None)

    lines = ["| method | sparsity | params (M) | held-out ppl | time (s) | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['sparsity']:g} | {r['params'] / 1e6:.2f} | {r['ppl']:.3f} | "
                     f"{r['seconds']:.0f} | {r['note']} |")
    table = "\n".join(lines)
    print("\n" + table)
    meta = {"steps": steps, "eval_windows": eval_windows, "quick": args.quick, "lr": args.lr or defaults.lr,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
