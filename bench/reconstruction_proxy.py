"""Does the search's loss rank masks like the model `bpp prune` writes?

The search judges a mask by its bias-compensated soft loss (FLAP's output biases, cross-entropy
against the dense model's next-token distribution) on batches of calibration windows; the model
`bpp prune` writes is reconstructed (o_proj/down_proj refit by damped least squares). For each
sparsity this script builds the allocation policy's start as `bpp prune` does (the init's per-layer
counts, FLAP's ranking inside layers, on 32 calibration windows of 256 tokens, seed 0), draws K
masks around it the way the policy does (antithetic pairs of smooth directions over depth, at
σ = 0.05 and, for a wider spread, σ = 0.15; KV groups stay the start's) and computes per mask:

- proxy: the search's loss (``MaskLosses``, objective soft, bias compensation) on the incumbent's
  16 held-in calibration windows of 128 tokens;
- the reconstructed model (``bpp.reconstruction.reconstruct`` on ``--recon-windows`` calibration
  windows of 128 tokens, seed 0, then compacted): its soft loss and NLL on the same held-in windows
  and its NLL on ``--eval-windows`` held-out windows spread over the held-out text;
- the bias-compensated compacted model's NLL on the same held-out windows.

It reports Spearman and Kendall rank correlations between proxy and reconstructed losses over all
K masks, the fraction of mask pairs ordered alike, and the fraction of antithetic pairs (the
differences the gradient uses) whose sign agrees; beside them, the reconstructed model's own
held-in NLL against its held-out NLL (what no held-in criterion can beat).

    OMP_NUM_THREADS=1 python bench/reconstruction_proxy.py --sparsities 0.4,0.2 --init flap
    python bench/reconstruction_proxy.py --table-only   # the agreements and the table again from the JSON
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from scipy import stats as scistats

from common import load_default, machine_line, utc_now, window_nll

from bpp.bias_compensation import BiasCompensation, InputStats
from bpp.compaction import compact_model
from bpp.data import windows
from bpp.methods import initialise, rank_scores
from bpp.reconstruction import DAMPING, reconstruct
from bpp.search import PruneConfig, SearchStart, config_budget, mask_losses, needs_ranking, new_policy, selection_windows
from bpp.space import MaskSpace


def spread_windows(ids: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    """``n`` non-overlapping windows spread evenly over ``ids``."""
    total = ids.numel() // seq_len
    data = ids[: total * seq_len].view(total, seq_len)
    return data if n >= total else data[torch.linspace(0, total - 1, n).round().long()]


@torch.no_grad()
def window_soft_nll(model, dense_logprobs: list[torch.Tensor], ids: torch.Tensor, batch_size: int = 4,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) per-window mean cross-entropy of ``model`` against the dense next-token distribution
    (``dense_logprobs``: its log-probabilities per batch of ``batch_size`` windows) and (n,) NLL."""
    soft, nll = [], []
    for k, start in enumerate(range(0, ids.shape[0], batch_size)):
        batch = ids[start:start + batch_size]
        q = torch.log_softmax(model(batch).logits[:, :-1].float(), -1)
        soft.append(-(dense_logprobs[k].float().exp() * q).sum(-1).double().mean(1))
        nll.append(-q.gather(-1, batch[:, 1:, None]).squeeze(-1).double().mean(1))
    return torch.cat(soft), torch.cat(nll)


@torch.no_grad()
def dense_logprobs(model, ids: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """The dense model's next-token log-probabilities per batch, in bfloat16 (kept for every mask)."""
    return [torch.log_softmax(model(ids[s:s + batch_size]).logits[:, :-1].float(), -1).bfloat16()
            for s in range(0, ids.shape[0], batch_size)]


COMPARISONS = {  # name: (ranking, what it should rank like)
    "proxy vs reconstructed soft, held-in": ("proxy_soft_heldin", "recon_soft_heldin"),
    "proxy vs reconstructed NLL, held-in": ("proxy_soft_heldin", "recon_nll_heldin"),
    "proxy vs reconstructed NLL, held-out": ("proxy_soft_heldin", "recon_nll_heldout"),
    "bias vs reconstructed NLL, held-out": ("bias_nll_heldout", "recon_nll_heldout"),
    # the ceiling of any held-in criterion: the reconstructed model itself, held-in vs held-out windows
    "reconstructed NLL, held-in vs held-out": ("recon_nll_heldin", "recon_nll_heldout"),
}


def rank_agreement(proxy: list[float], target: list[float]) -> dict:
    """Spearman ρ, Kendall τ and the fraction of pairs the two order alike (ties count half)."""
    pairs = list(itertools.combinations(range(len(proxy)), 2))
    agree = sum(1.0 if (proxy[i] - proxy[j]) * (target[i] - target[j]) > 0 else
                0.5 if (proxy[i] - proxy[j]) * (target[i] - target[j]) == 0 else 0.0 for i, j in pairs)
    return {"spearman": float(scistats.spearmanr(proxy, target)[0]), "kendall": float(scistats.kendalltau(proxy, target)[0]),
            "pairs_ordered_alike": agree / len(pairs), "n": len(proxy)}


def antithetic_agreement(proxy: list[float], target: list[float]) -> float:
    """Of the antithetic pairs (masks 2i, 2i+1), the fraction whose loss difference has the same sign."""
    signs = [(proxy[i] - proxy[i + 1]) * (target[i] - target[i + 1]) > 0 for i in range(0, len(proxy), 2)]
    return sum(signs) / len(signs)


def masks_around_start(model, tok, calib_ids, sparsity: float, init: str, pairs: dict[float, int], seed: int):
    """The policy's start (as `bpp prune` builds it), its bias compensation, its search losses and
    the masks drawn around it: ``pairs[σ]`` antithetic pairs per σ, interleaved (+, −)."""
    config = PruneConfig(sparsity=sparsity, init=init).validate()
    space = MaskSpace.from_model(model)
    calib = windows(tok, calib_ids, config.init_seq_len, config.init_windows, seed=config.seed)
    theta, init_mask, metrics = initialise(config_budget(space, config), config.init, model, calib)
    stats = InputStats(model).collect(calib)
    comp = BiasCompensation.from_stats(model, stats)
    ranking = rank_scores(needs_ranking(config), model, space, stats, calib, config.sparsity, config.init, metrics)
    policy = new_policy(space, config, SearchStart(theta, init_mask, metrics, ranking))
    losses, _ = mask_losses(model, config)
    losses.compensation = comp
    generator = torch.Generator().manual_seed(seed)
    drawn, sigmas = [], []
    for sigma, n in pairs.items():
        policy.sigma = sigma
        masks, _ = policy.pair_masks(policy.draw_directions(n, generator))
        drawn += [masks[i:i + 1] for i in range(masks.S)]
        sigmas += [sigma] * masks.S
    return config, comp, losses, policy.deterministic_mask(), drawn, sigmas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", default="0.4,0.2")
    ap.add_argument("--init", default="flap", help="the start's per-layer counts: flap (fast) | besa (bpp prune's default)")
    ap.add_argument("--pairs", default="0.05:4,0.15:2", help="σ:antithetic pairs, comma-separated (K = 2 × pairs)")
    ap.add_argument("--recon-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0, help="seeds the directions")
    ap.add_argument("--json", default="bench/results/reconstruction-proxy.json")
    ap.add_argument("--table-only", action="store_true", help="recompute the agreements and the table from --json")
    args = ap.parse_args()
    if args.table_only:
        results = json.loads(Path(args.json).read_text())
        for entry in results["sparsities"]:
            add_agreement(entry)
        write_table(results, lambda: Path(args.json).write_text(json.dumps(results, indent=1) + "\n"))
        return
    pairs = {float(s): int(n) for s, n in (x.split(":") for x in args.pairs.split(","))}

    default = load_default()
    model, tok = default.model, default.tok
    held = spread_windows(default.held, 128, args.eval_windows)
    recon_calib = windows(tok, default.calib, 128, args.recon_windows, seed=0)
    results = {"meta": {"date": utc_now(), "machine": machine_line(), "command": "python " + " ".join(sys.argv),
                        "init": args.init, "pairs": args.pairs, "damping": DAMPING,
                        "recon_calib": f"default/calib, {args.recon_windows} x 128, seed 0",
                        "held_out": f"default/heldout, {held.shape[0]} x 128 spread"}, "sparsities": []}
    save = lambda: Path(args.json).write_text(json.dumps(results, indent=1) + "\n")  # noqa: E731
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        t0 = time.perf_counter()
        with torch.no_grad():
            config, comp, losses, start, drawn, sigmas = masks_around_start(
                model, tok, default.calib, sparsity, args.init, pairs, args.seed)
            held_in = selection_windows(default.calib, config)
            teacher = dense_logprobs(model, held_in)
            print(f"sparsity {sparsity:g}: start built in {time.perf_counter() - t0:.0f}s, {len(drawn)} masks", flush=True)
            entry = {"sparsity": sparsity, "start_seconds": time.perf_counter() - t0, "masks": []}
            for i, (mask, sigma) in enumerate(zip(drawn, sigmas)):
                t1 = time.perf_counter()
                proxy = float(losses.per_window(held_in, mask).mean())
                biased = compact_model(model, mask, **comp.compact_biases(mask))
                bias_held = float(window_nll(biased, held).mean())
                del biased
                t2 = time.perf_counter()
                fit = reconstruct(model, mask, recon_calib, damping=DAMPING)
                recon_seconds = time.perf_counter() - t2
                small = compact_model(model, mask, **fit.compact_kwargs())
                soft, nll = window_soft_nll(small, teacher, held_in)
                row = {"i": i, "sigma": sigma, "params": int(default.space.params(mask)[0]),
                       "differs_from_start": mask != start, "proxy_soft_heldin": proxy,
                       "recon_soft_heldin": float(soft.mean()), "recon_nll_heldin": float(nll.mean()),
                       "recon_nll_heldout": float(window_nll(small, held).mean()),
                       "bias_nll_heldout": bias_held, "recon_seconds": recon_seconds,
                       "recon_mean_errors": fit.mean_errors(), "seconds": time.perf_counter() - t1}
                entry["masks"].append(row)
                print(f"  mask {i} σ={sigma:g}: proxy {proxy:.4f}, recon soft {row['recon_soft_heldin']:.4f}, "
                      f"recon nll held-in {row['recon_nll_heldin']:.4f} / held-out {row['recon_nll_heldout']:.4f}, "
                      f"bias held-out {bias_held:.4f} ({row['seconds']:.0f}s, refit {recon_seconds:.0f}s)", flush=True)
                results["sparsities"] = [e for e in results["sparsities"] if e["sparsity"] != sparsity] + [entry]
                save()
        add_agreement(entry)
        results["sparsities"] = [e for e in results["sparsities"] if e["sparsity"] != sparsity] + [entry]
        save()
    write_table(results, save)


def add_agreement(entry: dict) -> None:
    """The rank agreements of one sparsity's masks, and the spread of their losses."""
    col = lambda k: [r[k] for r in entry["masks"]]  # noqa: E731
    entry["agreement"] = {}
    for name, (a, b) in COMPARISONS.items():
        rec = rank_agreement(col(a), col(b))
        rec["antithetic_pairs_alike"] = antithetic_agreement(col(a), col(b))
        entry["agreement"][name] = rec
    entry["spread"] = {k: [min(col(k)), max(col(k))] for k in ("proxy_soft_heldin", "recon_soft_heldin",
                                                                "recon_nll_heldout", "bias_nll_heldout")}


def write_table(results: dict, save) -> None:
    meta = results["meta"]
    lines = [f"{meta['machine']}; init {meta['init']}; masks per sparsity: σ:antithetic pairs {meta['pairs']}", "",
             "| sparsity | compared | Spearman ρ | Kendall τ | pairs ordered alike | antithetic pairs alike |",
             "|---|---|---|---|---|---|"]
    for entry in results["sparsities"]:
        for name, rec in entry["agreement"].items():
            lines.append(f"| {entry['sparsity']:g} | {name} | {rec['spearman']:+.2f} | {rec['kendall']:+.2f} | "
                         f"{rec['pairs_ordered_alike']:.2f} | {rec['antithetic_pairs_alike']:.2f} |")
    results["table"] = "\n".join(lines)
    print("\n" + results["table"])
    save()

if __name__ == "__main__":
    main()
