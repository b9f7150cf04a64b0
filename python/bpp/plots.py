"""The run folder's plots: kept units per layer, and the loss curve of the search."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .fileio import read_jsonl
from .masks import Masks
from .space import MaskSpace


def plot_kept_per_layer(path: Path, space: MaskSpace, final_mask: Masks, init_mask: Masks | None,
                        init_label: str = "init mask") -> None:
    """The fraction of MLP channels and KV groups each layer keeps, in the final mask and the
    init mask (``init_label`` names where it came from)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = np.arange(space.n_layers)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharex=True)
    heads = final_mask.heads is not None  # query-head slots: the share of query heads each layer keeps
    attention = ("heads", "query heads kept") if heads else ("groups", "KV groups kept")

    def kept(eff: Masks, field: str):
        units = eff.kept_heads(space.heads_per_group).flatten(2) if field == "heads" else getattr(eff, field)
        return units[0].float().mean(-1).numpy()

    for ax, field, title in ((axes[0], "channels", "MLP channels kept"), (axes[1], *attention)):
        for mask, label, style in ((init_mask, init_label, "--"), (final_mask, "final mask", "-")):
            if mask is None:
                continue
            ax.plot(layers, kept(mask.effective(), field), style, marker="o", ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction kept")
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss_curve(path: Path, metrics_path: Path) -> None:
    """The mean loss of each step's masks (and the baseline, where the policy has one); with an
    incumbent, the deterministic mask's held-in loss at each challenge and the incumbent's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(metrics_path, "the metrics") if metrics_path.is_file() else []
    steps = [r["step"] for r in records if r.get("mean_loss") is not None]
    checks = [r for r in records if r.get("selection")]
    fig, axes = plt.subplots(2 if checks else 1, 1, figsize=(7, 5.6 if checks else 3.6), sharex=True, squeeze=False)
    ax = axes[0, 0]
    if steps:
        ax.plot(steps, [r["mean_loss"] for r in records if r.get("mean_loss") is not None], lw=0.8,
                alpha=0.6, label="mean loss of the step's masks")
        if any(r.get("baseline") is not None for r in records):
            ax.plot(steps, [r.get("baseline") for r in records if r.get("mean_loss") is not None], lw=1.5,
                    label="baseline")
    ax.set_ylabel("loss on the step's batch")
    if checks:  # is the search learning or drifting? the deterministic mask on held-in windows
        held = axes[1, 0]
        x = [r["step"] + 1 for r in checks]
        held.plot(x, [r["selection"]["challenger_loss"] for r in checks], "o-", ms=3, lw=1.2,
                  label="deterministic mask")
        best = [r["selection"]["challenger_loss"] if r["selection"]["accepted"] else r["selection"]["incumbent_loss"]
                for r in checks]
        held.step([0] + x, [checks[0]["selection"]["incumbent_loss"]] + best, "k--", where="post", lw=1,
                  label="incumbent (the output)")
        held.set_ylabel("held-in windows' loss")
        held.grid(alpha=0.3)
        held.legend()
    axes[-1, 0].set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
