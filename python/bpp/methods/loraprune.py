"""LoRAPrune (Zhang et al., "LoRAPrune: Structured Pruning Meets Low-Rank Parameter-Efficient
Fine-Tuning", arXiv 2305.18403) on bpp's structured units.

LoRAPrune scores weights without the gradient of the pretrained weights (which would cost a full
copy of the model in gradients): with a LoRA adapter W' = W + s·B·A on a frozen W, the gradient of
the loss with respect to the merged weight is estimated from the adapter alone,

    G = s · (∂L/∂B · A + B · ∂L/∂A)

and a weight's importance is the first-order change of the loss when it is removed, |W' ⊙ G|.
A structured unit's importance sums that over the weights it owns (an MLP channel: its gate and up
rows and its down column; a KV group: the q rows of its query heads, its k and v rows, and the
o_proj columns of its query heads). Scores are smoothed over steps by an exponential moving
average (λ = ``ema``), and pruning is iterative: the adapter is fine-tuned on the calibration text
while, after each of ``rounds`` rounds of ``steps_per_round`` steps, the least important kept units
of every layer are removed (pruned units stay pruned, their inputs masked to zero), following a
cubic schedule to the final per-layer counts, as the paper's iterative procedure.

bpp's adaptation: the final counts are the per-type, layer-uniform counts of bpp's other metric
inits (the paper prunes each layer at the same ratio), so the LoRAPrune mask has the parameter count
of a PG mask at the same sparsity; as a θ prior the moving-average importance of every layer is
mapped to probabilities by the official ``sigmap`` at the keep rate. The adapter only serves the
importance estimate: the returned mask is applied to the *original* weights (``bpp recover``
fine-tunes the compacted model afterwards if wanted). The input model is left unchanged.

The model runs through bpp_kernels' masked ops (``LoRAPruneConfig.engine``) on the adapted weights
W + s·B·A, with the pruned units skipped (so their weights get exactly zero gradient, as the
hooks' zero scaling gives them) and the LM head fused with the loss; where the ops cannot compute
what the model does, "auto" runs the peft model with the pruned units' outputs scaled to zero by
hooks. Both give the same importance and masks on the tiny test models (tests/test_loraprune.py).

How it compares with the other methods: bench/RESULTS.md, quality section.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..budget import check_sparsity, parse_granularity
from ..errors import BppError
from ..masks import Masks
from ..modelio import PROJECTIONS
from ..models.blocks import GRADIENT_ENGINES, choose_engine, kernel_lm_loss, lora_weight
from ..space import MaskSpace
from .calibration import check_calib, eval_mode, input_scales
from .ranking import per_layer_counts, sigmap

TYPES = ("channel", "group")


@dataclass
class LoRAPruneConfig:
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-4  # the paper's fine-tuning rate
    rounds: int = 5  # pruning iterations
    steps_per_round: int = 8  # adapter updates (and importance estimates) between two prunings
    batch_size: int = 4  # calibration windows per step
    ema: float = 0.9  # λ of the importance moving average
    seed: int = 0
    # how the model runs: "kernels" (bpp_kernels' masked ops on the adapted weights W + s·B·A, pruned
    # units skipped, no full logits), "hf" (the peft model's forward, pruned units' outputs scaled to
    # zero by hooks), "auto" (kernels where they compute what the model does)
    engine: str = "auto"
    progress: bool = True

    def validate(self) -> "LoRAPruneConfig":
        for name in ("rank", "rounds", "steps_per_round", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise BppError(f"LoRAPrune {name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema < 1.0:
            raise BppError(f"LoRAPrune ema must lie in [0, 1), got {self.ema}")
        if not self.lr >= 0.0:
            raise BppError(f"LoRAPrune lr must be non-negative, got {self.lr}")
        if self.engine not in GRADIENT_ENGINES:
            raise BppError(f"LoRAPrune engine must be one of {', '.join(GRADIENT_ENGINES)}, got {self.engine!r}")
        return self


@dataclass
class LoRAPruneResult:
    masks: dict  # type → (L, n) bool, the final mask
    scores: dict  # type → (L, n) float64, moving-average importance at the end
    history: list  # per step: round, loss, kept units per type
    engine: str = "hf"  # what ran the model: "kernels" or "hf" (LoRAPruneConfig.engine)


def schedule(n_keep_final: int, n: int, round_: int, rounds: int) -> int:
    """Units of a layer kept after ``round_`` of ``rounds`` (cubic: prune most early, while the
    model is closest to the dense one, and little at the end, as gradual pruning schedules do)."""
    frac = 1.0 - (1.0 - round_ / rounds) ** 3
    return int(round(n - (n - n_keep_final) * frac))


def _unit_importance(layer, space: MaskSpace) -> dict[str, torch.Tensor]:
    """|W' ⊙ G| summed over each unit's weights, for one decoder layer wrapped by peft."""
    G, r, hd = space.n_groups, space.heads_per_group, space.head_dim

    def saliency(module) -> torch.Tensor:
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
        s = module.scaling["default"]
        if A.grad is None or B.grad is None:
            return torch.zeros_like(module.base_layer.weight, dtype=torch.float64)
        A64, B64 = A.detach().double(), B.detach().double()
        grad = s * (B.grad.double() @ A64 + B64 @ A.grad.double())
        merged = module.base_layer.weight.detach().double() + s * (B64 @ A64)
        return (merged * grad).abs()

    attn, mlp = layer.self_attn, layer.mlp
    channel = (saliency(mlp.gate_proj).sum(1) + saliency(mlp.up_proj).sum(1) + saliency(mlp.down_proj).sum(0))
    group = (saliency(attn.q_proj).sum(1).reshape(G, r * hd).sum(1)
             + saliency(attn.k_proj).sum(1).reshape(G, hd).sum(1)
             + saliency(attn.v_proj).sum(1).reshape(G, hd).sum(1)
             + saliency(attn.o_proj).sum(0).reshape(G, r * hd).sum(1))
    return {"channel": channel, "group": group}


def loraprune_allocate(model, space: MaskSpace, calib: torch.Tensor, keep: float,
                       granularity=("channel", "group"), config: LoRAPruneConfig | None = None) -> LoRAPruneResult:
    """Iterative LoRA-guided pruning to ``keep`` of every learned type's units in every layer."""
    from peft import LoraConfig, get_peft_model

    config = (config or LoRAPruneConfig()).validate()
    calib = check_calib(model, calib, "LoRAPrune")
    learned = parse_granularity(granularity)
    if "layer" in learned:
        raise BppError("LoRAPrune scores channels and KV groups, not whole layers")
    if not 0.0 < keep <= 1.0:
        raise BppError(f"keep rate must lie in (0, 1], got {keep}")
    L = space.n_layers
    sizes = {"channel": space.n_channels, "group": space.n_groups}
    final = {t: per_layer_counts(round(keep * L * sizes[t]), L) if t in learned else [sizes[t]] * L
             for t in TYPES}
    if any(k < 1 for k in final["group"]):
        raise BppError(f"keep rate {keep} leaves a layer without any KV group; LoRAPrune prunes width only")

    param = next(model.parameters())
    engine, _ = choose_engine(config.engine, model, calib.shape[1], "LoRAPrune", lm_head=True)
    work = copy.deepcopy(model).to(torch.float32)
    for p in work.parameters():
        p.requires_grad_(False)
    present = [t for t in PROJECTIONS if hasattr(work.model.layers[0].self_attn, t) or hasattr(work.model.layers[0].mlp, t)]
    with torch.random.fork_rng(devices=[]):  # the adapters' init is seeded, the caller's RNG left alone
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(work, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                                     target_modules=present, bias="none"))
    layers = work.model.layers  # peft replaced the projections in place
    masks = {t: torch.ones(L, sizes[t], dtype=torch.bool) for t in TYPES}
    live = {t: masks[t].to(param.device, torch.float32) for t in TYPES}
    scores = {t: torch.zeros(L, sizes[t], dtype=torch.float64, device=param.device) for t in TYPES}
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    calib = calib.to(param.device)
    cols = space.heads_per_group * space.head_dim
    history = []
    total = config.rounds * config.steps_per_round
    bar = tqdm(total=total, desc="LoRAPrune", unit="step", disable=not config.progress)
    with eval_mode(work), torch.enable_grad(), contextlib.ExitStack() as stack:
        if engine == "hf":  # pruned units' outputs scaled to zero
            for i, layer in enumerate(layers):
                stack.enter_context(input_scales(layer, (lambda i=i: live["group"][i]),
                                                  (lambda i=i: live["channel"][i]), cols))
        for round_ in range(1, config.rounds + 1):
            for _ in range(config.steps_per_round):
                rows = torch.randint(0, calib.shape[0], (config.batch_size,), generator=gen).to(calib.device)
                batch = calib[rows]
                if engine == "kernels":  # pruned units skipped; their weights get exactly zero gradient
                    loss = kernel_lm_loss(work, batch, lora_weight, masks)
                else:
                    loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():  # scores stay on the device: no host sync per layer
                    for i, layer in enumerate(layers):
                        now = _unit_importance(layer, space)
                        for t in TYPES:
                            scores[t][i] = now[t] if not history else config.ema * scores[t][i] + (1 - config.ema) * now[t]
                opt.step()
                history.append({"round": round_, "loss": float(loss.detach()),
                                **{f"kept_{t}s": int(masks[t].sum()) for t in TYPES}})
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", round=round_)
            for t in learned:  # prune this round's share: the least important kept units of each layer
                host = scores[t].cpu()  # one copy per round and type
                for i in range(L):
                    k = schedule(final[t][i], sizes[t], round_, config.rounds)
                    ranked = torch.where(masks[t][i], host[i], torch.full_like(host[i], -1.0))
                    order = torch.sort(-ranked, stable=True).indices
                    masks[t][i] = torch.zeros(sizes[t], dtype=torch.bool)
                    masks[t][i][order[:k]] = True
                live[t] = masks[t].to(param.device, torch.float32)
    bar.close()
    del peft_model, work
    return LoRAPruneResult(masks, {t: v.cpu() for t, v in scores.items()}, history, engine)


# --- the two entry points (bpp.methods.METHODS) ---------------------------------------------------

def loraprune_mask(model, space: MaskSpace, calib: torch.Tensor, sparsity: float,
                   config: LoRAPruneConfig | None = None) -> Masks:
    """The LoRAPrune mask (S = 1) at ``sparsity`` of every layer's channels and KV groups: the
    per-type counts (so the parameter count) of a PG mask at that sparsity."""
    sparsity = check_sparsity(sparsity)
    result = loraprune_allocate(model, space, calib, 1.0 - sparsity, ("channel", "group"), config)
    return Masks(result.masks["channel"].unsqueeze(0), result.masks["group"].unsqueeze(0),
                 torch.ones(1, space.n_layers, dtype=torch.bool))


def loraprune_prior(model, space: MaskSpace, calib: torch.Tensor, keep: float, granularity,
                   config: LoRAPruneConfig | None = None):
    """θ prior from LoRAPrune: each layer's moving-average importance mapped by sigmap to
    probabilities with mean ``keep``; units LoRAPrune removed rank last. Returns (θ per type (L, n),
    the LoRAPrune mask per type (L, n) bool, metrics)."""
    learned = parse_granularity(granularity)
    result = loraprune_allocate(model, space, calib, keep, learned, config)
    theta = {}
    for t in TYPES:
        if t in learned:
            # pruned units keep their (stale) score below every kept unit's, so the ranking is the mask's
            s = result.scores[t].clone()
            floor = torch.where(result.masks[t], s, torch.full_like(s, float("inf"))).min(-1, keepdim=True).values
            s = torch.where(result.masks[t], s, torch.minimum(s, floor * (1 - 1e-6)))
            theta[t] = sigmap(s, keep)
        else:
            theta[t] = torch.ones_like(result.scores[t])
    metrics = {**result.scores, "loss": torch.tensor([h["loss"] for h in result.history])}
    return theta, result.masks, metrics
