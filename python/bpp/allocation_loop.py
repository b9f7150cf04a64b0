"""The allocation policy's loop inside ``bpp prune`` (issue 18), and building it: the within-layer
ranking (scores the job computes with :mod:`bpp.methods` and passes in), a fresh or a resumed loop.

Steps alternate between kinds (see :mod:`bpp.allocation`):
- channel steps: P = samples/2 antithetic pairs on one calibration batch (or, with
  ``--sampling independent``, samples draws each against the mean of the others); the gradient
  of the smoothed loss from the paired differences; an Adam step on the
  per-layer channel offsets, lr on the run's schedule; offsets re-centred (the shift is free);
- group steps (every ``group_every``-th): the deterministic mask and up to samples − 1 single-layer
  KV-group moves on one batch; each move's paired differences accumulate, and the move whose mean
  improvement exceeds ``GROUP_Z`` standard errors (at least two batches) is taken, after which
  the statistics start again (the centre moved).

State that makes a run resumable bit for bit, beyond the base loop's: offsets, group counts, the
ranks and init counts, Adam's moments, the group statistics and move queue, the incumbent, the
evaluation counter.
"""
from __future__ import annotations

import math
import time

import torch

from .allocation import Adam, AllocationPolicy, GroupMove, half_correlation, ranks_from_scores
from .errors import BppError
from .policy_gradient import PolicyGradientLoop, PruneConfig, _fmt, learning_rate
from .space import Masks, MaskSpace

GROUP_Z = 2.0  # a group move is taken when its mean improvement exceeds this many standard errors
GROUP_ROUNDS = 2  # group steps stop after this many full rounds over the moves without taking one
SNR_MOMENTUM = 0.9  # the progress bar's moving average of the half-batch gradient correlation


# --- the ranking and the policy ------------------------------------------------------------------

def init_ranking(scores: torch.Tensor, init_mask: torch.Tensor) -> torch.Tensor:
    """Ranks (L, n) with the init mask's kept units first, each part ordered by the score: offsets
    0 then reproduce the init mask whatever produced it."""
    s = scores.to(torch.float64)
    spread = float(s.max() - s.min()) + 1.0
    return ranks_from_scores(s + init_mask.to(torch.float64) * 2 * spread)


def build_policy(space: MaskSpace, config: PruneConfig, init_mask: Masks, metrics: dict,
                 rank_scores: dict | None) -> AllocationPolicy:
    """The allocation policy starting at ``init_mask`` (S = 1), ranking units by ``config.rank``:
    the init method's own ``metrics`` ("init"), else ``rank_scores`` ``{"channel": (L, m),
    "group": (L, G)}`` (FLAP's or wanda-sp's, computed by the job)."""
    if config.rank == "init":
        if "channel" not in metrics or "group" not in metrics:
            raise BppError(f"--init {config.init} gives no per-unit scores to rank by; pass --rank flap or wanda-sp")
        channel_ranks = init_ranking(metrics["channel"], init_mask.channels[0])
        group_ranks = init_ranking(metrics["group"], init_mask.groups[0])
    else:
        channel_ranks, group_ranks = ranks_from_scores(rank_scores["channel"]), ranks_from_scores(rank_scores["group"])
    return AllocationPolicy(space, channel_ranks, group_ranks, init_mask.channels[0].sum(-1),
                            init_mask.groups[0].sum(-1), config.sparsity, sigma=config.sigma,
                            learn_groups=config.group_every > 0, basis=config.basis)


# --- the loop ------------------------------------------------------------------------------------

class AllocationLoop(PolicyGradientLoop):
    """The allocation policy's steps; checkpoints, metrics and the incumbent as the base loop."""

    def __init__(self, policy: AllocationPolicy, losses_fn, windows, config, out_dir=None, checkpoint_every=0,
                 progress=True, extra_state=None):
        super().__init__(policy, losses_fn, windows, config, out_dir, checkpoint_every, progress, extra_state)
        self.adam = Adam(policy.n_coefficients)
        self.grad_sum = torch.zeros(policy.n_coefficients, dtype=torch.float64)  # per-coefficient signal/noise
        self.grad_sq = torch.zeros(policy.n_coefficients, dtype=torch.float64)
        self.grad_steps = 0
        self.group_stats: dict[tuple[int, int], list[float]] = {}  # (layer, delta) -> paired differences
        self.move_queue: list[tuple[int, int]] = []
        self.quiet_rounds = 0  # full rounds over the group moves that found none worth taking
        self.round_open = False  # a round over the moves is under way and no move was taken in it
        self.window_losses = None  # (ids, masks) -> (S, B): per-window losses for group steps (set by prune)
        self.evaluations = 0
        self.snr = None  # moving average of the half-batch correlation

    def is_group_step(self, step: int) -> bool:
        every = self.config.group_every
        return bool(every) and step % every == every - 1 and self.quiet_rounds < GROUP_ROUNDS

    def deterministic_mask(self) -> Masks:
        return self.policy.center_mask()

    def postfix(self, record: dict) -> dict:
        inc = self.incumbent
        return dict(loss=_fmt(record["mean_loss"]), snr=_fmt(self.snr, 2),
                    held_in=_fmt(None if inc is None else inc.loss), groups=int(self.policy.groups.sum()),
                    masks_s=_fmt(record["masks_per_s"], 1))

    def _next_moves(self, n: int) -> list[GroupMove]:
        feasible = {(m.layer, m.delta) for m in self.policy.feasible_moves()}
        self.move_queue = [mv for mv in self.move_queue if mv in feasible]
        if len(self.move_queue) < n:  # a new round over every feasible move, in a seeded order
            if self.round_open:
                self.quiet_rounds += 1  # a whole round went by without a move
            self.round_open = True
            fresh = sorted(feasible)
            order = torch.randperm(len(fresh), generator=self.generator).tolist()
            self.move_queue += [fresh[i] for i in order]
        chosen, self.move_queue = self.move_queue[:n], self.move_queue[n:]
        return [GroupMove(layer, delta) for layer, delta in chosen]

    def run_step(self) -> dict:
        cfg, policy = self.config, self.policy
        t0 = time.perf_counter()
        batch = self.windows[self.step * cfg.batch_size:(self.step + 1) * cfg.batch_size]
        device = torch.device(cfg.device)
        lr = self.learning_rate()
        record = {"step": self.step, "lr": lr}
        if self.is_group_step(self.step) and policy.feasible_moves():
            record.update(self._group_step(batch, device))
        else:
            record.update(self._channel_step(batch, device, lr))
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.step += 1
        record.update(seconds=dt, masks_per_s=record["evaluated"] / dt if dt > 0 else None,
                      evaluations=self.evaluations, kept_groups=int(policy.groups.sum()))
        return record

    def learning_rate(self) -> float:
        return learning_rate(self.config, self.step)

    def _channel_step(self, batch, device, lr) -> dict:
        policy, antithetic = self.policy, self.config.sampling == "antithetic"
        n = self.config.samples // 2 if antithetic else self.config.samples
        eps = policy.draw_directions(n, self.generator)
        masks, _ = policy.pair_masks(eps) if antithetic else policy.draw_masks(eps)
        losses = self.losses_fn(batch.to(device), masks.to(device)).detach().double().cpu()
        self.evaluations += masks.S
        self.dropped_masks += int((~torch.isfinite(losses)).sum())
        record = {"kind": "channel", "evaluated": masks.S,
                  "losses": [x if math.isfinite(x) else None for x in losses.tolist()]}
        if antithetic:  # the pair's difference: each pair is its own baseline
            diffs = policy.pair_differences(losses)
            valid = torch.isfinite(diffs)
        else:  # each draw against the mean of the other draws on the same batch
            valid = torch.isfinite(losses)
            diffs = torch.zeros_like(losses)
            if int(valid.sum()) >= 2:
                diffs[valid] = policy.leave_one_out(losses[valid])
            else:
                valid[:] = False
        if int(valid.sum()) == 0:
            self.skipped_steps += 1
            return {**record, "mean_loss": None, "skipped": True}
        eps, diffs = eps[valid], diffs[valid]
        scale = 2.0 * policy.sigma if antithetic else policy.sigma
        grad = policy.coefficients((diffs.unsqueeze(-1) * eps).mean(0) / scale)
        self.grad_sum += grad
        self.grad_sq += grad * grad
        self.grad_steps += 1
        if self.config.optimizer == "adam":
            step = self.adam.update(grad, lr)
        else:  # plain steps of the per-step normalised gradient (the step size does not follow the loss scale)
            step = lr * grad / grad.pow(2).mean().sqrt().clamp_min(1e-300)
        update = policy.from_coefficients(step)
        policy.offsets = policy.offsets - update
        policy.offsets = policy.offsets - policy.offsets.mean()
        corr = half_correlation(eps, diffs)
        if corr is not None:
            self.snr = corr if self.snr is None else SNR_MOMENTUM * self.snr + (1 - SNR_MOMENTUM) * corr
        good = losses[torch.isfinite(losses)]
        return {**record, "mean_loss": float(good.mean()), "skipped": False,
                "pair_difference_sd": float(diffs.std()) if diffs.numel() > 1 else None,
                "grad_half_correlation": corr, "snr": self.snr, "grad_norm": float(grad.norm()),
                "update_max": float(update.abs().max()), "grad": grad.tolist()}

    def _group_step(self, batch, device) -> dict:
        policy = self.policy
        moves = self._next_moves(self.config.samples - 1)
        masks = policy.move_masks(moves)
        if self.window_losses is not None:  # per window: the noise of a move is judged window by window
            per_window = self.window_losses(batch.to(device), masks.to(device)).detach().double().cpu()
        else:
            per_window = self.losses_fn(batch.to(device), masks.to(device)).detach().double().cpu().unsqueeze(1)
        losses = per_window.mean(1)
        self.evaluations += masks.S
        record = {"kind": "group", "evaluated": masks.S, "moves": [[m.layer, m.delta] for m in moves],
                  "losses": [x if math.isfinite(x) else None for x in losses.tolist()]}
        if not math.isfinite(float(losses[0])):
            self.skipped_steps += 1
            return {**record, "mean_loss": None, "skipped": True}
        for mv, row in zip(moves, (per_window[1:] - per_window[0]).tolist()):
            if all(math.isfinite(x) for x in row):
                self.group_stats.setdefault((mv.layer, mv.delta), []).extend(row)
        taken = self._decide()
        if taken is not None:
            policy.apply(taken)
            self.group_stats.clear()
            self.move_queue.clear()
            self.quiet_rounds, self.round_open = 0, False
        return {**record, "mean_loss": float(losses[0]), "skipped": False,
                "taken": None if taken is None else [taken.layer, taken.delta]}

    def _decide(self) -> GroupMove | None:
        """The move with the lowest mean per-window difference, if it is below −GROUP_Z standard
        errors; the per-window noise is pooled over all moves seen since the centre last moved
        (each move has only a few windows of its own)."""
        stats = {k: torch.tensor(d, dtype=torch.float64) for k, d in self.group_stats.items() if d}
        residuals = torch.cat([d - d.mean() for d in stats.values()]) if stats else torch.zeros(0)
        dof = residuals.numel() - len(stats)
        if dof < 2:
            return None
        sd = float(residuals.pow(2).sum() / dof) ** 0.5
        best, best_mean = None, 0.0
        for (layer, delta), d in stats.items():
            mean, se = float(d.mean()), sd / math.sqrt(d.numel())
            if mean < -GROUP_Z * se and mean < best_mean:
                best, best_mean = GroupMove(layer, delta), mean
        return best

    # --- checkpoint/resume ------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["allocation"] = {
            "policy": self.policy.state(),
            "channel_ranks": self.policy.channel_ranks.clone(), "group_ranks": self.policy.group_ranks.clone(),
            "base": self.policy.base.clone(), "adam": self.adam.state(),
            "group_stats": {f"{k[0]},{k[1]}": list(v) for k, v in self.group_stats.items()},
            "move_queue": [list(m) for m in self.move_queue], "evaluations": self.evaluations, "snr": self.snr,
            "quiet_rounds": self.quiet_rounds, "round_open": self.round_open,
            "grad_moments": (self.grad_sum.clone(), self.grad_sq.clone(), self.grad_steps),
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        a = state["allocation"]
        self.policy.load_state(a["policy"])
        self.policy.channel_ranks, self.policy.group_ranks = a["channel_ranks"].clone(), a["group_ranks"].clone()
        self.policy.base = a["base"].clone()
        self.adam.load_state(a["adam"])
        self.group_stats = {tuple(int(x) for x in k.split(",")): list(v) for k, v in a["group_stats"].items()}
        self.move_queue = [tuple(m) for m in a["move_queue"]]
        self.quiet_rounds, self.round_open = a["quiet_rounds"], a["round_open"]
        self.evaluations, self.snr = a["evaluations"], a["snr"]
        s_, q_, n_ = a["grad_moments"]
        self.grad_sum, self.grad_sq, self.grad_steps = s_.clone(), q_.clone(), int(n_)

    def gradient_t_statistics(self) -> list[float] | None:
        """Per learned coordinate: mean gradient over the channel steps / its standard error (|t| ≫ 2:
        a direction the data agree on; |t| ≲ 1: noise)."""
        n = self.grad_steps
        if n < 2:
            return None
        mean = self.grad_sum / n
        var = (self.grad_sq / n - mean * mean).clamp_min(0) * n / (n - 1)
        return (mean / (var / n).sqrt().clamp_min(1e-300)).tolist()




# --- building the loop (called by bpp.jobs.prune) -------------------------------------------------

def new_loop(space: MaskSpace, policy, config: PruneConfig, init_mask: Masks | None, metrics: dict,
             rank_scores: dict | None, loop_args: tuple) -> PolicyGradientLoop:
    """The loop of a fresh run: the per-unit loop over ``policy`` (θ, already initialised), or the
    allocation loop starting at the init method's mask."""
    if config.policy == "units":
        return PolicyGradientLoop(policy, *loop_args)
    if init_mask is None:
        raise BppError(f"--policy allocation starts from an init method's mask; --init {config.init} has none")
    return AllocationLoop(build_policy(space, config, init_mask, metrics, rank_scores), *loop_args)


def resumed_loop(policy, state: dict, loop_args: tuple) -> PolicyGradientLoop:
    """The loop of a resumed run (its state is loaded afterwards)."""
    config = loop_args[2]
    if config.policy == "units":
        return PolicyGradientLoop(policy, *loop_args)
    a = state["allocation"]
    space = policy.space
    base = torch.round(a["base"] * space.n_channels).long()
    alloc = AllocationPolicy(space, a["channel_ranks"], a["group_ranks"], base, a["policy"]["groups"],
                             config.sparsity, sigma=config.sigma, learn_groups=config.group_every > 0,
                             basis=config.basis)
    return AllocationLoop(alloc, *loop_args)


def policy_record(loop: PolicyGradientLoop) -> dict:
    """What the policy learned, for the report: the allocation (kept counts per layer, offsets,
    the gradient's signal to noise), or θ's entropy."""
    if isinstance(loop, AllocationLoop):
        channels, groups = loop.policy.center_counts()
        return {"allocation": {"evaluations": loop.evaluations, "snr": loop.snr,
                               "gradient_t_statistics": loop.gradient_t_statistics(),
                               "kept_groups": int(groups.sum()), "kept_channels_per_layer": channels.tolist(),
                               "kept_groups_per_layer": groups.tolist(), "offsets": loop.policy.offsets.tolist()}}
    theta = loop.policy.theta
    return {"theta": {"mean_entropy": loop.policy.mean_entropy(),
                      "fraction_at_0_or_1": float(((theta == 0) | (theta == 1)).double().mean())}}


def allocation_file(loop: AllocationLoop) -> dict:
    """``allocation.json``: the deterministic allocation, the offsets, the init's counts."""
    channels, groups = loop.policy.center_counts()
    return {"kept_channels": channels.tolist(), "kept_groups": groups.tolist(),
            "offsets": loop.policy.offsets.tolist(),
            "init_channels": torch.round(loop.policy.base * loop.policy.space.n_channels).long().tolist(),
            "evaluations": loop.evaluations}
