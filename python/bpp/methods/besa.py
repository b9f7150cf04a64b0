"""BESA (Xu et al., "BESA: Pruning Large Language Models with Blockwise Parameter-Efficient
Sparsity Allocation", ICLR 2024; official code OpenGVLab/LLMPrune-BESA) on bpp's structured units.

BESA prunes one decoder block at a time. The block's inputs are the outputs of the blocks before
it *as pruned*; its reference outputs are the dense block applied to those inputs. In every
prunable "layer" of the block the units are ranked by an importance metric, and the layer's keep
rate is a learned distribution over a grid of candidate rates: with candidate unit counts c_k and
probabilities p = softmax(logits), the expected mask of the unit ranked r (0 = most important) is

    E[m_r] = Σ_k p_k · 1[r < c_k]                                        (differentiable in p)

and the block's forward uses the hard mask that keeps the round(Σ_k p_k c_k) top units, with the
gradient of the expected mask (a straight-through estimator, as the official code does). Only the
logits are trained (the weights stay frozen), on

    loss = reconstruction + λ · ((sparsity − target) / target)²

where the reconstruction is the official per-feature normalised squared error
Σ_f Σ_tokens (y − ŷ)² / Σ_tokens y² / d, and the sparsity is parameter-weighted over the block.

bpp's adaptation: the prunable "layers" of a block are its attention KV groups (G units, each
costing ``space.group_params``) and its MLP channels (m units, ``space.channel_params`` each); the
metric is bpp's wanda-sp score (|W|·input RMS at o_proj / down_proj, as :mod:`bpp.methods.wanda_sp`); what is
learned is how the parameter budget splits between attention and MLP within each block, and (by
default) across blocks. Departures from the official code, and why:

- plain softmax over the candidate logits (the official default squashes the logits through a
  sigmoid first, which caps every candidate's probability ratio at e and so the expected keep rate
  at about 0.62: fine for its 50% target, out of reach for 20% sparsity), initialised at the
  maximum-entropy distribution whose expected rate is the target (the official all-zero start is
  the uniform distribution, expected rate 0.5);
- Adam on the logits (the official code uses Prodigy, not a dependency here);
- KV groups use the expected mask in the forward pass too (``soft_types``), channels the
  straight-through hard mask. With 3 groups a block, the straight-through linearisation of
  removing a third of the attention is poor: the learned group rate sat on the rounding boundary
  (2.5 groups) and the final choice was noise (bench/RESULTS.md, "BESA ablations"). Scaling a group's output by its keep
  probability costs (1 − p)²·E for a group whose removal costs E, so rounding the relaxed optimum
  at p = 1/2 takes the same decision as comparing E with the penalty's price;
- ``across_blocks`` (default) also learns the split across blocks: under a soft penalty (λ = 0.05,
  not the official 5, which pins every block to the target) each block settles at its own
  parameter keep rate, and the final block budgets are those rates rescaled (water-filled, none
  above a whole block) to meet the global budget; blocks whose reconstruction suffers more keep
  more. During the pass each block's inputs come from the earlier blocks at their learned (not yet
  rescaled) rates. ``across_blocks=False`` gives every block the target, as the official method;
- the masks are discretised so the *whole model* meets the same parameter budget as a PG mask at
  that sparsity: each block's group count is its rounded learned group rate (clamped so the
  channels can make up the rest), channels fill the block's budget, and the rounding remainder is
  carried to the next block, so the total is within half a channel of the target.

The block runs through bpp_kernels' masked ops (``BesaConfig.engine``): its weights packed once,
the masks being learned passed as per-unit scales with every unit kept (a unit the straight-through
mask zeroes still needs its gradient), only the scales differentiated; the fixed-mask pass that
feeds the next block skips the pruned units. Where the ops cannot compute what the Hugging Face
layer does (:func:`bpp.models.blocks.kernel_blocks_unsupported`), "auto" runs the Hugging Face
layer itself with its o_proj / down_proj inputs scaled by hooks; both give the same masks on
the tiny test models (tests/test_besa.py).

How it compares with the other methods, and the ablations behind these choices: bench/RESULTS.md,
quality section.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass, field

import torch

from ..budget import check_sparsity, parse_granularity
from ..errors import BppError
from ..masks import Masks
from ..models.blocks import GRADIENT_ENGINES, choose_engine, kernel_block, pack_block
from ..models.replay import layer_inputs, run_layer
from ..space import MaskSpace
from .besa_relaxation import (candidate_counts, discretise_block, expected_count, expected_mask, init_logits,
                              rescale_budgets, straight_through_mask)
from .calibration import check_calib, eval_mode, input_scales, input_squares, wanda_sp_scores
from .ranking import sigmap

TYPES = ("channel", "group")


@dataclass
class BesaConfig:
    """Knobs of the blockwise allocation (the defaults: 64 optimiser steps per block on 32
    calibration windows)."""

    epochs: int = 4  # passes over the calibration windows per block
    batch_size: int = 2  # windows per optimiser step
    lr: float = 0.2  # Adam on the candidate logits
    # λ of the sparsity term. The official --sparsity-beta is 5, which holds every block at the
    # target; across_blocks needs a soft penalty so that blocks can settle at different rates.
    penalty: float = 0.05
    rate_step: float = 0.01  # spacing of the candidate keep rates (official --sparsity-step)
    across_blocks: bool = True  # also learn how the budget splits across blocks
    soft_types: tuple = ("group",)  # unit types whose forward uses the expected mask, not the hard one
    # how a block runs while its allocation is learned: "kernels" (bpp_kernels' masked ops, the
    # scales as per-unit scales), "hf" (the Hugging Face layer with its projections' inputs scaled
    # by hooks), "auto" (kernels where they compute what the layer does: calibration.kernel_blocks_unsupported)
    engine: str = "auto"
    progress: bool = True

    def validate(self) -> "BesaConfig":
        if self.epochs < 1 or self.batch_size < 1:
            raise BppError("BESA needs epochs >= 1 and batch_size >= 1")
        if not (0.0 < self.rate_step <= 1.0) or self.lr <= 0 or self.penalty <= 0:
            raise BppError("BESA needs 0 < rate_step <= 1, lr > 0 and penalty > 0")
        unknown = [t for t in self.soft_types if t not in TYPES]
        if unknown:
            raise BppError(f"BESA soft_types must be among {', '.join(TYPES)}, got {', '.join(map(str, unknown))}")
        if self.engine not in GRADIENT_ENGINES:
            raise BppError(f"BESA engine must be one of {', '.join(GRADIENT_ENGINES)}, got {self.engine!r}")
        return self


@dataclass
class BesaResult:
    """What one BESA pass produced: per type, the bool (L, n) masks, the wanda-sp scores (L, n),
    the learned (expected) keep rates (L,) and the final discretised keep rates (L,)."""

    masks: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    learned_rates: dict[str, torch.Tensor]
    keep_rates: dict[str, torch.Tensor]
    block_keep: torch.Tensor  # (L,) learned parameter keep rate of each block (over learned types)
    reconstruction: torch.Tensor  # (L,) final reconstruction loss of each block's hard mask
    history: list = field(default_factory=list)
    engine: str = "hf"  # what ran the blocks: "kernels" or "hf" (BesaConfig.engine)


# --- one block ---------------------------------------------------------------------------------

def _reconstruction(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The official normalised error: per output feature, Σ_tokens (y − ŷ)² / Σ_tokens y², averaged
    over the features."""
    ref = ref.float().reshape(-1, ref.shape[-1])
    err = (out.float().reshape(-1, out.shape[-1]) - ref).pow(2).sum(0)
    return (err / ref.pow(2).sum(0).clamp_min(1e-12)).mean()


@torch.no_grad()
def _dense_pass(layer, hidden: list[torch.Tensor], kwargs: dict, space: MaskSpace):
    """Reference outputs of the dense block and its wanda-sp scores on these inputs."""
    with input_squares(layer, space) as sums:
        outputs = [run_layer(layer, h, kwargs) for h in hidden]
    scores = wanda_sp_scores(layer, space, sums["o"], sums["down"], sum(h.shape[0] for h in hidden))
    return outputs, scores


def besa_allocate(model, space: MaskSpace, calib: torch.Tensor, keep: float,
                  granularity=("channel", "group"), config: BesaConfig | None = None) -> BesaResult:
    """Run BESA block by block; masks keep ``keep`` of the learned types' parameters (whole model).
    The result depends only on the model, the windows, the options and this code, so it is kept
    by :mod:`bpp.results_cache` and a second run on the same ones reads it back."""
    from .. import results_cache
    from ..models import blocks, replay
    from . import besa_relaxation, calibration

    config = (config or BesaConfig()).validate()
    calib = check_calib(model, calib, "BESA")
    options = {k: v for k, v in vars(config).items() if k != "progress"}
    key = results_cache.model_key(model, "besa v1", calib, float(keep), tuple(parse_granularity(granularity)),
                                  sorted(options.items()), sys.modules[__name__], besa_relaxation, calibration,
                                  blocks, replay)
    saved = results_cache.load("besa", key)
    if isinstance(saved, dict):
        try:
            return BesaResult(**saved)
        except TypeError:  # saved by other code: computed again
            pass
    result = _allocate(model, space, calib, keep, granularity, config)
    results_cache.save("besa", key, dataclasses.asdict(result))
    return result


def _allocate(model, space: MaskSpace, calib: torch.Tensor, keep: float, granularity,
              config: BesaConfig) -> BesaResult:
    from tqdm.auto import tqdm

    learned = tuple(t for t in TYPES if t in parse_granularity(granularity))
    if not learned:
        raise BppError("BESA allocates channels and/or KV groups; granularity 'layer' alone has neither")
    if not 0.0 < keep < 1.0:
        raise BppError(f"keep rate must be strictly between 0 and 1, got {keep}")
    L, G, m = space.n_layers, space.n_groups, space.n_channels
    sizes = {"channel": m, "group": G}
    cost = {"channel": float(space.channel_params), "group": float(space.group_params)}
    block_params = sum(sizes[t] * cost[t] for t in learned)
    total_budget = keep * L * block_params
    if total_budget < min(cost[t] for t in learned) or L * block_params - total_budget < min(cost[t] for t in learned):
        raise BppError(f"sparsity {1 - keep:g} removes less than one unit (or leaves less than one) of "
                       f"{','.join(learned)}; choose a sparsity further from 0 and 1")
    counts = {t: candidate_counts(sizes[t], config.rate_step) for t in learned}
    device = next(model.parameters()).device
    cols = space.heads_per_group * space.head_dim

    with torch.no_grad():
        hidden = [layer_inputs(model, calib[i:i + config.batch_size].to(device))[0]
                  for i in range(0, calib.shape[0], config.batch_size)]
        _, kwargs = layer_inputs(model, calib[:1].to(device))  # batch-1 extras broadcast to any batch
    no_rope = None if "position_embeddings" in kwargs else "the model passes its layers no position embeddings"
    engine, _ = choose_engine(config.engine, model, calib.shape[1], "BESA", reason=no_rope)
    if engine == "kernels":
        import bpp_kernels as K

        cos, sin = (t[0].detach() for t in kwargs["position_embeddings"])  # (T, hd), the same for every window

    masks = {t: torch.ones(L, sizes[t], dtype=torch.bool) for t in TYPES}
    scores = {t: torch.zeros(L, sizes[t], dtype=torch.float64) for t in TYPES}
    learned_rates = {t: torch.ones(L, dtype=torch.float64) for t in TYPES}
    block_keep = torch.ones(L, dtype=torch.float64)
    recon = torch.zeros(L, dtype=torch.float64)
    history = []
    carry = 0.0
    bar = tqdm(range(L), desc="BESA blocks", unit="block", disable=not config.progress)
    for i in bar:
        layer = model.model.layers[i]
        with eval_mode(layer):
            refs, block_scores = _dense_pass(layer, hidden, kwargs, space)
            if engine == "kernels":  # frozen weights, packed once; only the scales get gradients
                block = pack_block(layer)
                block_out = lambda h, **units: kernel_block(block, h[None], cos, sin, **units)[0]  # noqa: E731
            orders = {}
            for t in TYPES:
                scores[t][i] = block_scores[t]
                orders[t] = torch.sort(-block_scores[t], stable=True).indices.to(device)
            logits = {t: init_logits(counts[t], sizes[t], keep).to(device).requires_grad_(True)
                      for t in learned}
            opt = torch.optim.Adam(list(logits.values()), lr=config.lr)
            current = {}

            def unit_mask(t):  # rank-order (straight-through or expected) mask → unit order
                if t in config.soft_types:
                    ranked = expected_mask(torch.softmax(logits[t], -1), counts[t], sizes[t])
                else:
                    ranked = straight_through_mask(logits[t], counts[t], sizes[t])
                return torch.empty_like(ranked).scatter(0, orders[t], ranked)

            def block_keep_rate():
                return sum(expected_count(torch.softmax(logits[t], -1), counts[t]) * cost[t]
                           for t in learned) / block_params

            scale = {t: (lambda t=t: current[t]) if t in learned else None for t in TYPES}
            target_sparsity = 1.0 - keep
            if engine == "kernels":  # every unit kept (a straight-through zero still needs its gradient)
                scaled = contextlib.nullcontext()
                learning_out = lambda h: block_out(h, **{f"{t}_scale": current[t][None] for t in learned})  # noqa: E731
            else:
                scaled = input_scales(layer, scale["group"], scale["channel"], cols)
                learning_out = lambda h: run_layer(layer, h, kwargs)  # noqa: E731
            with torch.enable_grad(), scaled:
                for epoch in range(config.epochs):
                    for h, ref in zip(hidden, refs):
                        for t in learned:
                            current[t] = unit_mask(t)
                        rec = _reconstruction(learning_out(h), ref)
                        sparsity = 1.0 - block_keep_rate()
                        loss = rec + config.penalty * ((sparsity - target_sparsity) / target_sparsity) ** 2
                        grads = torch.autograd.grad(loss, list(logits.values()))
                        for p, g in zip(logits.values(), grads):
                            p.grad = g
                        opt.step()
                        history.append({"block": i, "epoch": epoch, "loss": float(loss.detach()),
                                        "reconstruction": float(rec.detach()), "sparsity": float(sparsity.detach())})
            with torch.no_grad():
                for t in learned:
                    learned_rates[t][i] = float(expected_count(torch.softmax(logits[t], -1), counts[t])) / sizes[t]
                block_keep[i] = float(block_keep_rate())
                # the block's mask: the final one (per-block budgets), or the learned rates as they are
                if config.across_blocks:
                    k = {t: int(round(float(learned_rates[t][i]) * sizes[t])) for t in learned}
                else:
                    k_g, k_c, carry = discretise_block(keep * block_params, float(learned_rates["group"][i]),
                                                        carry, space, learned)
                    k = {"group": k_g, "channel": k_c}
                for t in learned:
                    masks[t][i] = torch.zeros(sizes[t], dtype=torch.bool)
                    masks[t][i][orders[t][:k[t]].cpu()] = True
                if engine == "kernels":  # pruned units skipped, not scaled by zero
                    kept = {f"{t}s": K.mask_to_index(masks[t][i][None].to(device)) for t in TYPES}
                    outs = [block_out(h, **kept) for h in hidden]
                else:
                    fixed = {t: masks[t][i].to(device).float() for t in TYPES}
                    with input_scales(layer, (lambda: fixed["group"]) if "group" in learned else None,
                                       (lambda: fixed["channel"]) if "channel" in learned else None, cols):
                        outs = [run_layer(layer, h, kwargs) for h in hidden]
                recon[i] = sum(float(_reconstruction(o, r)) * o.shape[0] for o, r in zip(outs, refs)) / calib.shape[0]
                hidden = outs
        bar.set_postfix({"groups": int(masks["group"][i].sum()), "channels": int(masks["channel"][i].sum()),
                         "recon": f"{float(recon[i]):.2e}"})

    if config.across_blocks:  # final budgets: the learned block rates, rescaled onto the global budget
        budgets = rescale_budgets(block_keep, block_params, total_budget)
        carry = 0.0
        for i in range(L):
            k_g, k_c, carry = discretise_block(float(budgets[i]), float(learned_rates["group"][i]), carry,
                                                space, learned)
            for t, k in (("group", k_g), ("channel", k_c)):
                if t in learned:
                    order = torch.sort(-scores[t][i], stable=True).indices
                    masks[t][i] = torch.zeros(sizes[t], dtype=torch.bool)
                    masks[t][i][order[:k]] = True
    keep_rates = {t: masks[t].double().mean(-1) for t in TYPES}
    return BesaResult(masks, scores, learned_rates, keep_rates, block_keep, recon, history, engine)


# --- the two entry points (bpp.methods.METHODS) ---------------------------------------------------

def besa_mask(model, space: MaskSpace, calib: torch.Tensor, sparsity: float,
              config: BesaConfig | None = None) -> Masks:
    """The BESA mask (S = 1) at ``sparsity`` of the prunable (group + channel) parameters: the same
    parameter count as a PG mask at that sparsity, within one channel's cost."""
    sparsity = check_sparsity(sparsity)
    result = besa_allocate(model, space, calib, 1.0 - sparsity, ("channel", "group"), config)
    L = space.n_layers
    return Masks(result.masks["channel"].unsqueeze(0), result.masks["group"].unsqueeze(0),
                 torch.ones(1, L, dtype=torch.bool))


def besa_prior(model, space: MaskSpace, calib: torch.Tensor, keep: float, granularity,
              config: BesaConfig | None = None):
    """θ prior from BESA's learned allocation: within each layer, the units ranked by the wanda-sp
    score, mapped by sigmap to probabilities whose layer mean is that layer's BESA keep rate.
    Returns (θ per type (L, n), the BESA mask per type (L, n) bool, metrics)."""
    result = besa_allocate(model, space, calib, keep, granularity, config)
    theta = {}
    for t in TYPES:
        if t in parse_granularity(granularity):
            rows = [sigmap(result.scores[t][i].unsqueeze(0), float(result.keep_rates[t][i]))[0]
                    for i in range(space.n_layers)]
            theta[t] = torch.stack(rows)
        else:
            theta[t] = torch.ones_like(result.scores[t])
    metrics = {**result.scores,
               "channel_keep_rate": result.keep_rates["channel"], "group_keep_rate": result.keep_rates["group"],
               "channel_learned_rate": result.learned_rates["channel"],
               "group_learned_rate": result.learned_rates["group"],
               "block_keep": result.block_keep, "reconstruction": result.reconstruction}
    return theta, result.masks, metrics
