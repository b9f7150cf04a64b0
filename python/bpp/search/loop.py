"""The loop that drives any policy: each step takes the next calibration batch, asks the policy
for masks, evaluates them on the batch (the same batch for all of them), tells the policy their
losses, and records the step. Every ``incumbent_every`` steps the policy's deterministic mask
challenges the incumbent on the selection windows.

State that makes a run resumable bit for bit (written atomically every ``checkpoint_every``
steps, and at step 0): the policy's own state, the step (which is also the data cursor and the
schedule position: batches are consecutive slices of a seeded shuffle, and the learning rate is
a function of the step), the mask-sampling generator, the global torch/Python/NumPy RNG states,
the counters and timings, the incumbent.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from ..budget import Budget
from ..checkpoints import CHECKPOINT, fingerprint, rng_state, save_checkpoint, set_rng_state
from ..errors import BppError
from ..masks import Masks
from .config import PruneConfig, learning_rate, rounds
from .incumbent import Incumbent
from .interface import SearchPolicy, fmt
from .objective import LossesFn


class SearchLoop:
    """Runs the steps of one configuration from ``self.step`` to ``config.steps``.

    ``losses_fn(ids, masks) -> (S,)`` evaluates masks; ``window_losses(ids, masks) -> (S, B)``
    per window, for proposals that ask for it (without it, the mean loss stands for every window)."""

    def __init__(self, policy: SearchPolicy, losses_fn: LossesFn, windows: torch.Tensor, config: PruneConfig,
                 out_dir: Path | None = None, checkpoint_every: int = 0, progress: bool = True,
                 extra_state: dict | None = None, window_losses: LossesFn | None = None):
        self.policy, self.losses_fn, self.windows, self.config = policy, losses_fn, windows, config
        self.window_losses = window_losses
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self.step = 0
        self.evaluations = 0  # masks evaluated so far
        self.generator = torch.Generator().manual_seed(config.seed)
        self.skipped_steps = 0
        self.dropped_masks = 0
        self.seconds = 0.0  # time spent in steps, over all sessions
        self.extra_state = extra_state or {}  # carried through checkpoints (timings of earlier phases, ...)
        self.incumbent: Incumbent | None = None
        self.selection_losses: LossesFn | None = None  # (ids (n, T), masks) -> (S, n) per-window losses
        self.selection_ids: torch.Tensor | None = None
        self.snapshots: list[int] = []  # save the deterministic mask once this many masks were evaluated

    @property
    def budget(self) -> Budget:
        return self.policy.budget

    def deterministic_mask(self) -> Masks:
        return self.policy.deterministic_mask()

    def output_mask(self) -> Masks:
        """What the run writes: the incumbent, or the policy's deterministic mask without one."""
        return self.incumbent.mask if self.incumbent is not None else self.deterministic_mask()

    # --- the incumbent ----------------------------------------------------------------------
    def attach_incumbent(self, selection_losses: LossesFn, selection_ids: torch.Tensor | None,
                         first: Masks | None) -> None:
        """The incumbent's judge and, in a fresh run, the first incumbent: ``first`` (the init mask)
        or the policy's starting deterministic mask."""
        if selection_ids is None:
            return
        self.selection_losses, self.selection_ids = selection_losses, selection_ids
        if self.incumbent is None:
            first = first if first is not None else self.deterministic_mask()
            with torch.no_grad():
                self.incumbent = Incumbent(first, selection_losses(selection_ids, first)[0], step=self.step)

    def challenge_incumbent(self) -> dict | None:
        """Every ``incumbent_every`` steps and after the last: the deterministic mask against the
        incumbent on the selection windows (see :mod:`.incumbent`)."""
        every = self.config.incumbent_every
        if self.incumbent is None or self.selection_losses is None or not every or (
                self.step % every and not self.done()):
            return None
        mask = self.deterministic_mask()
        t0 = time.perf_counter()
        losses = self.selection_losses(self.selection_ids, mask)[0]
        record = self.incumbent.challenge(mask, losses, self.step)
        record["seconds"] = time.perf_counter() - t0
        self.seconds += record["seconds"]
        return record

    def done(self) -> bool:
        """The last step has run, or the mask evaluations asked for (``--evaluations``) are spent."""
        cap = self.config.evaluations
        return self.step >= self.config.steps or (cap is not None and self.evaluations >= cap)

    # --- one step ---------------------------------------------------------------------------
    def evaluate(self, batch: torch.Tensor, masks: Masks, per_window: bool) -> torch.Tensor:
        device = torch.device(self.config.device)
        batch, masks = batch.to(device), masks.to(device)
        if per_window and self.window_losses is not None:
            return self.window_losses(batch, masks).detach().double().cpu()
        losses = self.losses_fn(batch, masks).detach().double().cpu()
        return losses.unsqueeze(1) if per_window else losses

    def run_step(self) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        batch = self.windows[self.step * cfg.batch_size:(self.step + 1) * cfg.batch_size]
        lr = learning_rate(cfg, self.step)
        starts = rounds(cfg)
        if self.step in starts[1:]:  # a new round starts at the best mask so far
            self.policy.new_round(starts.index(self.step), self.incumbent.mask if self.incumbent else None)
        proposal = self.policy.ask(self.step, self.generator)
        losses = self.evaluate(batch, proposal.masks, proposal.per_window)
        S = proposal.masks.S
        self.evaluations += S
        self.dropped_masks += int((~torch.isfinite(losses.reshape(S, -1).mean(1))).sum())
        record = {"step": self.step, "lr": lr, **self.policy.tell(proposal, losses, lr)}
        self.skipped_steps += bool(record["skipped"])
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.step += 1
        record.update(seconds=dt, masks_per_s=S / dt if dt > 0 else None, evaluations=self.evaluations)
        return record

    def _save_snapshots(self) -> None:
        while self.snapshots and self.evaluations >= self.snapshots[0] and self.out_dir is not None:
            self.deterministic_mask().save(self.out_dir / f"snapshot_{self.snapshots.pop(0)}.safetensors")

    def postfix(self, record: dict) -> dict:
        shown = self.policy.postfix(record)
        if self.incumbent is not None:
            shown["held_in"] = fmt(self.incumbent.loss)
        return shown

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=self.config.steps, initial=self.step, desc="policy gradient", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        metrics = open(self.out_dir / "metrics.jsonl", "a") if self.out_dir else None
        try:
            while not self.done():
                record = self.run_step()
                selection = self.challenge_incumbent()
                if selection is not None:
                    record["selection"] = selection
                self._save_snapshots()
                if metrics:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                bar.update(1)
                bar.set_postfix(self.postfix(record))
                if self.out_dir and self.checkpoint_every and self.step % self.checkpoint_every == 0 \
                        and not self.done():
                    self.save_checkpoint()
        finally:
            bar.close()
            if metrics:
                metrics.close()

    # --- reports ----------------------------------------------------------------------------
    def summary(self) -> dict:
        """The policy's summary and the incumbent's record, for the report."""
        out = self.policy.summary(self.evaluations)
        inc = self.incumbent
        if inc is not None:
            out["incumbent"] = {"last_changed_at_step": inc.changed_at, "selection_loss": inc.loss,
                                "selection_windows": int(inc.window_losses.numel()), "challenges": len(inc.history),
                                "accepted": sum(h["accepted"] for h in inc.history), "history": inc.history}
        return out

    def outputs(self) -> dict:
        return self.policy.outputs(self.evaluations)

    # --- checkpoint/resume ------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "step": self.step,
            "policy": {"name": self.policy.name, **self.policy.state()},
            "schedule": {"kind": self.config.schedule, "lr": self.config.lr, "total_steps": self.config.steps},
            "generator": self.generator.get_state(),
            "rng": rng_state(),
            "data": {"cursor": self.step * self.config.batch_size, "windows": fingerprint(self.windows)},
            "space": dataclasses.asdict(self.policy.space),
            "counters": {"skipped_steps": self.skipped_steps, "dropped_masks": self.dropped_masks,
                         "seconds": self.seconds, "evaluations": self.evaluations},
            "extra": self.extra_state,
            "incumbent": None if self.incumbent is None else self.incumbent.state(),
        }

    def save_checkpoint(self, path: Path | None = None) -> Path:
        path = Path(path) if path else self.out_dir / CHECKPOINT
        return save_checkpoint(self.state_dict(), path)

    def load_state_dict(self, state: dict) -> None:
        """Restore the loop's own state (the policy is built from ``state["policy"]`` beforehand)."""
        saved = PruneConfig.from_dict(state["config"])
        diff = saved.differences(self.config)
        if diff:
            raise BppError("the checkpoint was made with a different configuration: " + "; ".join(diff))
        if state["space"] != dataclasses.asdict(self.policy.space):
            raise BppError("the checkpoint was made for a different model (its prunable units differ)")
        if state["data"]["windows"] != fingerprint(self.windows):
            raise BppError("the calibration text differs from the one the checkpoint was made with")
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        c = state["counters"]
        self.skipped_steps, self.dropped_masks, self.seconds = c["skipped_steps"], c["dropped_masks"], c["seconds"]
        self.evaluations = int(c["evaluations"])
        self.extra_state = dict(state.get("extra", {}))
        if state.get("incumbent") is not None:
            self.incumbent = Incumbent.from_state(state["incumbent"])
