"""Companion-method rows of bench/quality.py (``--companions``), at the parameter count of the PG
masks of the same sparsity:

- BESA: its blockwise learned allocation as a mask (alone and with FLAP-style bias compensation),
  and as the prior θ₀ of the default PG run (``bpp prune --init besa``).
- LoRAPrune: its iterative LoRA-gradient mask, and as the prior θ₀ (``--init loraprune``).
- Pangu Light: the default PG mask compacted with Stabilized LayerNorm Pruning and with the RMSNorm
  scales absorbed into the next linear layers; Cross-Layer Attention Pruning on a mask that also
  drops layers.
- Recovery: the default PG mask compacted, then LoRA-fine-tuned (``bpp recover``) for a few steps
  on the calibration text; held-out perplexity before and after.
"""
from __future__ import annotations

import copy
import time

import torch

from bpp.compaction import compact_model
from bpp.data import load_text, tokenize
from bpp.policy_gradient import PruneConfig

DEFAULT_PG = "PG S=8 moving-avg (default)"
RECOVER_STEPS = 40


def companion_rows(model, tok, space, sparsity, init_calib, held, add, pg_masks, *, steps, eval_windows, stats=None):
    from quality import pg_mask

    from bpp.methods.besa import besa_mask
    from bpp.methods.loraprune import loraprune_mask

    for name, fn in (("BESA", besa_mask), ("LoRAPrune", loraprune_mask)):
        t0 = time.perf_counter()
        mask = fn(model, space, init_calib, sparsity)
        seconds = time.perf_counter() - t0
        kept = f"{int(mask.groups.sum())}/{mask.groups[0].numel()} KV groups kept"
        add(f"{name} mask", sparsity, mask, seconds, kept)
        if stats is not None:
            add.compacted(f"{name} mask + bias compensation", sparsity, mask, stats, seconds, kept)
        init = name.lower()
        config = PruneConfig(sparsity=sparsity, steps=steps, samples=8, init=init, budget="params")  # its allocation across types kept
        t0 = time.perf_counter()
        mask, report = pg_mask(model, tok, config)
        t = report["timings_s"]
        add(f"PG S=8 --init {init} --budget params", sparsity, mask, t["init"] + t["policy_gradient"],
            f"{steps} steps, {t['per_step']:.1f}s/step")
        if stats is not None:
            add.compacted(f"PG S=8 --init {init} --budget params + bias compensation", sparsity, mask, stats,
                          t["init"] + t["policy_gradient"], "`bpp compact --bias-compensation`")

    base = pg_masks.get(DEFAULT_PG)
    if base is None:
        print(f"(the {DEFAULT_PG} row did not run: Pangu Light and recovery rows are left out)", flush=True)
        return
    params = int(space.params(base)[0])
    pangu_rows(model, tok, space, sparsity, init_calib, add, base, params)

    from bpp.methods.lora_recovery import lora_recover

    small = compact_model(model, base)
    train = tokenize(tok, load_text("default", "calib"))
    t0 = time.perf_counter()
    merged, log = lora_recover(copy.deepcopy(small), tok, train, steps=RECOVER_STEPS, progress=False)
    add.model(f"{DEFAULT_PG} + LoRA recovery", sparsity, merged, params, time.perf_counter() - t0,
              f"`bpp recover`, {RECOVER_STEPS} steps of 4×128 tokens, rank 8")


def pangu_rows(model, tok, space, sparsity, init_calib, add, base, params):
    from bpp.methods.pangu import PanguOptions, calibrate, transform

    def compacted(mask, **flags):
        t0 = time.perf_counter()
        options = calibrate(model, mask, init_calib, PanguOptions(**flags))
        return compact_model(model, mask, transform=transform(options)), time.perf_counter() - t0, options

    for flags in ({"slnp": True}, {"absorb_norms": True}, {"slnp": True, "absorb_norms": True}):
        small, seconds, _ = compacted(base, **flags)
        cli = " ".join("--" + k.replace("_", "-") for k in flags)
        add.model(f"{DEFAULT_PG} + {cli}", sparsity, small, params, seconds, f"`bpp compact {cli}`")

    # CLAP needs dropped layers: a depth-pruning mask at about the same parameter count (the layers
    # whose output hidden state is most like their input, "block influence"), alone and with CLAP
    t0 = time.perf_counter()
    drop = layer_drop_mask(model, space, init_calib, round(sparsity * space.prunable_params / space.layer_params))
    seconds = time.perf_counter() - t0
    n = int((~drop.layers).sum())
    layer_params = int(space.params(drop)[0])
    add(f"block-influence layer drop ({n} layers)", sparsity, drop, seconds, "depth pruning, no width pruning")
    small, more, options = compacted(drop, clap=True)
    add.model(f"block-influence layer drop ({n} layers) + --clap", sparsity, small, layer_params, seconds + more,
              f"{len(options.report['clap_moved_groups'])} KV groups moved")


@torch.no_grad()
def layer_drop_mask(model, space, calib, n_drop):
    """Drop the ``n_drop`` layers with the least block influence, 1 − cos(h_in, h_out) averaged over
    calibration tokens (ShortGPT's criterion)."""
    from bpp.space import Masks

    influence = torch.zeros(space.n_layers, dtype=torch.float64)
    for start in range(0, calib.shape[0], 8):
        hidden = model(calib[start:start + 8], output_hidden_states=True, use_cache=False).hidden_states
        for i in range(space.n_layers):
            cos = torch.nn.functional.cosine_similarity(hidden[i].double(), hidden[i + 1].double(), dim=-1)
            influence[i] += float((1 - cos).sum())
    mask = Masks.full(space, 1)
    mask.layers[0, torch.sort(influence, stable=True).indices[:n_drop]] = False
    return mask
