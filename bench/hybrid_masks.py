"""Masks that mix two masks' structure, to see which part of a mask carries its quality: ``h1``
keeps the first mask's KV groups with the channels spread over the layers like the second's
per-layer counts; ``h2`` keeps every KV group with the channels spread like the first's. Channels
are chosen inside each layer by the ranking of an allocation-policy ``bpp prune`` run (its
checkpoint) and rounded to the first (h1) or second (h2) mask's channel total with the policy's
shared shift. With ``--spread-of MASK`` (e.g. the default's output): ``h3`` spreads the channels
like MASK's per-layer counts and keeps the first mask's KV groups; with ``--flap-groups-at P`` also
``h4``: MASK's spread with the KV groups of FLAP's mask at sparsity P on the seed's calibration
windows (32 x 256 tokens, ``--calib-seed``); their channel totals meet the parameter budget of
MASK's (rounded to a whole channel). Evaluate them with ``bench/reconstruction.py --masks
h1-P=OUT/h1.safetensors,...``.

    python bench/hybrid_masks.py RUN/checkpoint.pt FLAP_MASK BESA_MASK --out OUT [--spread-of DEFAULT_MASK [--flap-groups-at 0.3]]
"""
import argparse
from pathlib import Path

import torch

from bpp.errors import BppError
from bpp.masks import Masks
from bpp.search.counts import shifted_counts, top_masks


def spread_mask(ranks: torch.Tensor, group_ranks: torch.Tensor, levels: torch.Tensor, total: int,
                groups: torch.Tensor | None, out: Path, name: str) -> None:
    """The mask whose channels follow ``levels`` (kept fraction per layer) rounded to ``total``,
    the top channels of each layer by ``ranks``, with ``groups`` (None: every KV group); saved as
    OUT/NAME.safetensors."""
    cap, G = ranks.shape[-1], group_ranks.shape[-1]
    counts = shifted_counts(levels.unsqueeze(0), torch.tensor([total]), cap)
    mask = top_masks(ranks, group_ranks, counts, torch.full_like(counts, G))
    if groups is not None:
        mask = Masks(mask.channels, groups.clone(), mask.layers)
    mask.save(out / f"{name}.safetensors")
    print(f"{name}: {int(mask.groups.sum())} KV groups, channels per layer {counts[0].tolist()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint.pt of an allocation-policy bpp prune run (the ranking)")
    ap.add_argument("first", help="mask whose KV groups h1 keeps and whose channel spread h2 takes (e.g. FLAP's)")
    ap.add_argument("second", help="mask whose channel spread h1 takes and whose channel total h2 keeps (e.g. BESA's)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--spread-of", default=None,
                    help="also h3: this mask's channel spread with the first mask's groups")
    ap.add_argument("--flap-groups-at", type=float, default=None, help="also h4: --spread-of's spread with the groups "
                    "of FLAP's mask at this sparsity")
    ap.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration windows FLAP's mask is made on")
    args = ap.parse_args()
    if args.flap_groups_at is not None and args.spread_of is None:
        ap.error("--flap-groups-at needs --spread-of")

    try:
        build(ap, args)
    except BppError as e:
        ap.error(str(e))


def build(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        policy = torch.load(args.checkpoint, weights_only=False).get("policy", {})
    except Exception as e:
        ap.error(f"{args.checkpoint} is not a readable checkpoint.pt ({type(e).__name__}: {e})")
    if "channel_ranks" not in policy:
        ap.error(f"{args.checkpoint} is not the checkpoint of an allocation-policy run (no channel ranking)")
    ranks, group_ranks = policy["channel_ranks"], policy["group_ranks"]
    first, second = Masks.load(args.first), Masks.load(args.second)
    if first.channels.shape != second.channels.shape or first.channels.shape[1:] != ranks.shape:
        ap.error("the two masks and the run's ranking must be of the same model")
    base = Masks.load(args.spread_of) if args.spread_of is not None else None
    if base is not None and base.channels.shape != first.channels.shape:
        ap.error(f"{args.spread_of} is a mask of another model than {args.first}")
    cap = first.channels.shape[-1]
    c1, c2 = first.channels[0].sum(-1).double(), second.channels[0].sum(-1).double()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spread_mask(ranks, group_ranks, c2 / cap, int(c1.sum()), first.groups, out, "h1")
    spread_mask(ranks, group_ranks, c1 / cap, int(c2.sum()), None, out, "h2")
    if base is not None:
        spread_masks(args, ranks, group_ranks, base, first, out)


def spread_masks(args, ranks: torch.Tensor, group_ranks: torch.Tensor, base: Masks, first: Masks, out: Path) -> None:
    """h3 (and h4): the channel spread of ``--spread-of`` with other KV groups, more channels for
    each group dropped so that the parameter count stays that of ``--spread-of``."""
    from bpp.data import load_text, window_bos, windows
    from bpp.methods import baseline_mask
    from bpp.modelio import load_model
    from bpp.space import MaskSpace

    model, tok = load_model(None)
    space = MaskSpace.from_model(model)
    per_group = space.group_params / space.channel_params  # a KV group's parameters in MLP channels
    kinds = [("h3", first.groups)]
    if args.flap_groups_at is not None:
        calib = windows(tok, load_text("default", "calib"), 256, 32, seed=args.calib_seed, bos=window_bos(model))
        kinds.append(("h4", baseline_mask("flap", model, space, calib, args.flap_groups_at).groups))
    levels = base.channels[0].sum(-1).double() / base.channels.shape[-1]
    for name, groups in kinds:
        dropped = int(base.groups.sum()) - int(groups.sum())
        spread_mask(ranks, group_ranks, levels, int(base.channels.sum()) + round(dropped * per_group), groups, out,
                    name)


if __name__ == "__main__":
    main()
