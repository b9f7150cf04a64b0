"""Pangu Light (arXiv 2505.20155) weight re-initialisation after pruning, on bpp's compaction.

Three transforms of the compacted model, each optional (``bpp compact --clap --slnp
--absorb-norms``); all of them keep the parameter count of the mask.

- **CLAP, Cross-Layer Attention Pruning.** When a layer is dropped, its attention is not simply
  lost: its KV groups compete with those of the next kept layer for that layer's K kept slots (K
  unchanged, so the size is the mask's), ranked by one importance score (bpp's wanda-sp group
  score on calibration text: |W_o|·input RMS, comparable across layers). The next kept layer's
  attention reads exactly the residual stream the dropped layer's attention read, so a moved group
  computes what it computed before, up to the input RMSNorm: its q/k/v columns are multiplied by
  γ_dropped / γ_target so the target layer's norm reproduces the dropped layer's. A dropped last
  layer gives its groups to the previous kept layer. Several dropped layers in a row all compete
  for the same next layer. Not for q/k-normed families (Qwen3): a layer has one q_norm / k_norm
  for all its heads, so a moved head cannot keep its own.
- **SLNP, Stabilized LayerNorm Pruning.** The paper prunes the hidden dimension too and rescales
  each pruned RMSNorm γ so its L2 norm is the original's, keeping activation scales stable. bpp
  never prunes the hidden dimension (its norms keep every entry), so the same principle is applied
  where bpp's width pruning changes a scale: the output of every width-pruned attention and MLP
  block. Each block's output projection is scaled by √(E‖y_dense‖² / E‖y_pruned‖²), measured on
  calibration text with the dense model's inputs, so the block adds to the residual stream with
  its original magnitude.
- **Absorbing norms.** Every RMSNorm γ that feeds linear layers is folded into their input
  columns (input norm → q/k/v, post-attention norm → gate/up, final norm → LM head when it is not
  tied to the embeddings) and set to 1. The logits are unchanged (up to rounding); the weights
  carry the scales, as the paper does before deployment.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..bias_compensation import InputStats
from ..errors import BppError
from ..masks import Masks
from ..space import MaskSpace
from .calibration import wanda_sp_scores


@dataclass
class PanguOptions:
    clap: bool = False
    slnp: bool = False
    absorb_norms: bool = False
    # filled by :func:`calibrate` when clap / slnp are on
    group_scores: torch.Tensor | None = None  # (L, G) of the original model
    attn_scale: list[float] | None = None  # per original layer
    mlp_scale: list[float] | None = None
    report: dict = field(default_factory=dict)

    @property
    def any(self) -> bool:
        return self.clap or self.slnp or self.absorb_norms


class _Collector(InputStats):
    """One pass of the dense model over calibration windows (FLAP's statistics: Σ x² of every
    input column of o_proj and down_proj, for the wanda-sp group score) and, per layer,
    under a mask, Σ‖W x‖² and Σ‖W (x ⊙ m)‖² (the SLNP scales)."""

    def __init__(self, model, masks: Masks, space: MaskSpace):
        super().__init__(model)
        self.space = space
        L = space.n_layers
        per_head = space.heads_per_group * space.head_dim
        self.cols = {"attn": [masks.groups[0, i].repeat_interleave(per_head) for i in range(L)],
                     "mlp": [masks.channels[0, i] for i in range(L)]}
        self.dense = {k: [0.0] * L for k in ("attn", "mlp")}
        self.pruned = {k: [0.0] * L for k in ("attn", "mlp")}

    def _hook(self, kind, i):
        moments = super()._hook(kind, i)  # Σ x, Σ x² per column and the token count

        def record(module, args):
            moments(module, args)
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            w = module.weight.detach().to(torch.float64)
            keep = self.cols[kind][i].to(x.device, torch.float64)
            self.dense[kind][i] += float((x @ w.T).pow(2).sum())
            self.pruned[kind][i] += float(((x * keep) @ w.T).pow(2).sum())
        return record


def group_scores_from_squares(model, space: MaskSpace, squares: list[torch.Tensor], n: int) -> torch.Tensor:
    """(L, G) wanda-sp group scores of every layer from Σ x² of its o_proj inputs over ``n`` tokens."""
    return torch.stack([wanda_sp_scores(layer, space, squares[i], None, max(n, 1))["group"]
                        for i, layer in enumerate(model.model.layers)])


def calibrate(model, masks: Masks, ids: torch.Tensor, options: PanguOptions) -> PanguOptions:
    """Fill the data-driven parts of ``options`` (CLAP group scores, SLNP scales) from one pass of
    the dense ``model`` over calibration windows ``ids`` (n, T)."""
    if not (options.clap or options.slnp):
        return options
    space = MaskSpace.from_model(model)
    masks.validate(space)
    if options.clap and space.qk_norm:
        raise BppError("--clap is not available for models with q/k norms (Qwen3): a layer has one q_norm and "
                       "k_norm for all its heads, so a moved head cannot keep its own")
    if not torch.is_tensor(ids) or ids.dim() != 2 or ids.shape[0] < 1:
        raise BppError("Pangu Light calibration needs (n, T) token windows, n ≥ 1")
    c = _Collector(model, masks, space).collect(ids)
    if options.clap:
        options.group_scores = group_scores_from_squares(model, space, c.squares["attn"], c.n)
    if options.slnp:
        def scale(kind, i):
            kept = c.cols[kind][i]
            if bool(kept.all()) or not bool(kept.any()) or c.pruned[kind][i] <= 0:
                return 1.0  # nothing pruned, or nothing left to scale
            return (c.dense[kind][i] / c.pruned[kind][i]) ** 0.5
        options.attn_scale = [scale("attn", i) for i in range(space.n_layers)]
        options.mlp_scale = [scale("mlp", i) for i in range(space.n_layers)]
    return options


def clap_plan(eff: Masks, kept_layers: list[int], scores: torch.Tensor) -> dict[int, list[tuple[int, int]]]:
    """For every kept layer that receives groups: its K slots as (source layer, group) pairs, the
    top K by score among its own kept groups and every group of the dropped layers assigned to it
    (in slot order: its own surviving groups first, in index order, then the moved ones)."""
    L = eff.layers.shape[1]
    dropped = [i for i in range(L) if i not in kept_layers]
    if not dropped or not kept_layers:
        return {}
    donors: dict[int, list[int]] = {}
    for i in dropped:
        later = [k for k in kept_layers if k > i]
        target = later[0] if later else kept_layers[-1]
        donors.setdefault(target, []).append(i)
    plan = {}
    for target, sources in donors.items():
        own = [(target, int(g)) for g in torch.nonzero(eff.groups[0, target]).flatten()]
        K = len(own)
        if K == 0:
            continue
        pool = own + [(i, g) for i in sources for g in range(eff.groups.shape[2])]
        ranked = sorted(pool, key=lambda p: (-float(scores[p[0], p[1]]), p[0] != target, p))
        chosen = set(ranked[:K])
        slots = [p for p in own if p in chosen] + [p for p in ranked[:K] if p[0] != target]
        if slots != own:
            plan[target] = slots
    return plan


@torch.no_grad()
def apply(src, new, eff: Masks, kept_layers: list[int], options: PanguOptions) -> dict:
    """Apply the chosen transforms to the compacted model ``new`` (made from ``src`` under ``eff``,
    layer j of ``new`` = layer ``kept_layers[j]`` of ``src``), in place. Returns what was done."""
    space = MaskSpace.from_model(src)
    G, r, hd, d = space.n_groups, space.heads_per_group, space.head_dim, space.hidden_size
    report = {}
    if options.clap:
        if options.group_scores is None:
            raise BppError("CLAP needs group scores: run bpp.methods.pangu.calibrate first")
        plan = clap_plan(eff, kept_layers, options.group_scores)
        moved = []
        for target, slots in plan.items():
            s_t = src.model.layers[target]
            da = new.model.layers[kept_layers.index(target)].self_attn
            gamma_t = s_t.input_layernorm.weight.detach().to(torch.float64)
            for j, (layer_idx, g) in enumerate(slots):
                s_layer = src.model.layers[layer_idx]
                sa = s_layer.self_attn
                ratio = s_layer.input_layernorm.weight.detach().to(torch.float64) / torch.where(
                    gamma_t.abs() < 1e-6, torch.full_like(gamma_t, 1e-6), gamma_t)
                for name, rows in (("q_proj", r * hd), ("k_proj", hd), ("v_proj", hd)):
                    w = getattr(sa, name).weight.view(G, rows, d)[g].to(torch.float64) * ratio
                    getattr(da, name).weight[j * rows:(j + 1) * rows] = w.to(getattr(da, name).weight.dtype)
                    if getattr(sa, name).bias is not None:
                        getattr(da, name).bias[j * rows:(j + 1) * rows] = getattr(sa, name).bias.view(G, rows)[g]
                da.o_proj.weight[:, j * r * hd:(j + 1) * r * hd] = sa.o_proj.weight.view(d, G, r * hd)[:, g]
                if layer_idx != target:
                    moved.append({"from_layer": layer_idx, "group": g, "to_layer": target})
        report["clap_moved_groups"] = moved
    if options.slnp:
        if options.attn_scale is None:
            raise BppError("SLNP needs its scales: run bpp.methods.pangu.calibrate first")
        for j, i in enumerate(kept_layers):
            layer = new.model.layers[j]
            if hasattr(layer.self_attn, "o_proj"):
                layer.self_attn.o_proj.weight.mul_(options.attn_scale[i])
            if hasattr(layer.mlp, "down_proj"):
                layer.mlp.down_proj.weight.mul_(options.mlp_scale[i])
        report["slnp_scales"] = {"attention": [round(options.attn_scale[i], 4) for i in kept_layers],
                                 "mlp": [round(options.mlp_scale[i], 4) for i in kept_layers]}
    if options.absorb_norms:
        report["absorbed_norms"] = absorb_norms(new)
    return report


def _fold(norm, linears) -> bool:
    if not linears:
        return False
    gamma = norm.weight.detach().to(torch.float64)
    for lin in linears:
        lin.weight.copy_((lin.weight.detach().to(torch.float64) * gamma).to(lin.weight.dtype))
    norm.weight.fill_(1.0)
    return True


@torch.no_grad()
def absorb_norms(model) -> list[str]:
    """Fold every RMSNorm γ into the input columns of the linear layers it feeds and set it to 1;
    the function the model computes is unchanged. Returns the norms folded."""
    folded = []
    for j, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if _fold(layer.input_layernorm, [getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj") if hasattr(attn, n)]):
            folded.append(f"layers.{j}.input_layernorm")
        if _fold(layer.post_attention_layernorm, [getattr(mlp, n) for n in ("gate_proj", "up_proj") if hasattr(mlp, n)]):
            folded.append(f"layers.{j}.post_attention_layernorm")
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        _fold(model.model.norm, [head])
        folded.append("norm")
    return folded


def transform(options: PanguOptions):
    """The chosen Pangu Light transforms as a compaction transform (``bpp.compaction``): applied to
    the compacted model, and what was done recorded under ``pangu_light``."""
    def apply_to(src, new, eff: Masks, kept_layers: list[int]) -> dict:
        options.report = apply(src, new, eff, kept_layers, options)
        return {"pangu_light": {"clap": options.clap, "slnp": options.slnp, "absorb_norms": options.absorb_norms,
                                **options.report}}
    return apply_to
