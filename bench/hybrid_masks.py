"""Masks that mix two masks' structure, to see which part of a mask carries its quality: ``h1``
keeps the first mask's KV groups with the channels spread over the layers like the second's
per-layer counts; ``h2`` keeps every KV group with the channels spread like the first's. Channels
are chosen inside each layer by the ranking of an allocation-policy ``bpp prune`` run (its
checkpoint) and rounded to the first (h1) or second (h2) mask's channel total with the policy's
shared shift. Evaluate them with ``bench/reconstruction.py --masks h1-P=OUT/h1.safetensors,...``.

    python bench/hybrid_masks.py RUN/checkpoint.pt FLAP_MASK BESA_MASK --out OUT
"""
import argparse
from pathlib import Path

import torch

from bpp.masks import Masks
from bpp.search.counts import shifted_counts, top_masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint.pt of an allocation-policy bpp prune run (the ranking)")
    ap.add_argument("first", help="mask whose KV groups h1 keeps and whose channel spread h2 takes (e.g. FLAP's)")
    ap.add_argument("second", help="mask whose channel spread h1 takes and whose channel total h2 keeps (e.g. BESA's)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    policy = torch.load(args.checkpoint, weights_only=False).get("policy", {})
    if "channel_ranks" not in policy:
        ap.error(f"{args.checkpoint} is not the checkpoint of an allocation-policy run (no channel ranking)")
    ranks, group_ranks = policy["channel_ranks"], policy["group_ranks"]
    first, second = Masks.load(args.first), Masks.load(args.second)
    if first.channels.shape != second.channels.shape or first.channels.shape[1:] != ranks.shape:
        ap.error("the two masks and the run's ranking must be of the same model")
    cap = first.channels.shape[-1]
    c1, c2 = first.channels[0].sum(-1).double(), second.channels[0].sum(-1).double()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, levels, total in [("h1", c2 / cap, int(c1.sum())), ("h2", c1 / cap, int(c2.sum()))]:
        counts = shifted_counts(levels.unsqueeze(0), torch.tensor([total]), cap)
        all_groups = torch.full_like(counts, first.groups.shape[-1])
        mask = top_masks(ranks, group_ranks, counts, all_groups)
        if name == "h1":
            mask = Masks(mask.channels, first.groups.clone(), mask.layers)
        mask.save(out / f"{name}.safetensors")
        print(f"{name}: {int(mask.groups.sum())} KV groups, channels per layer {counts[0].tolist()}")


if __name__ == "__main__":
    main()
