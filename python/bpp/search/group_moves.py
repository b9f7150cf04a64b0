"""KV-group moves of the allocation policy: single-layer changes of a layer's kept group count
(one more or one fewer), evaluated against the current mask on the same batch window by window.

The paired per-window differences accumulate per move; a move is taken when its mean improvement
exceeds ``GROUP_Z`` standard errors, with the per-window noise pooled over every move seen since
the centre last moved (each move has only a few windows of its own). Moves are visited in rounds
over every feasible move, in a seeded order; after ``GROUP_ROUNDS`` full rounds without a move
the group steps stop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GROUP_Z = 2.0  # a group move is taken when its mean improvement exceeds this many standard errors
GROUP_ROUNDS = 2  # group steps stop after this many full rounds over the moves without taking one


@dataclass
class GroupMove:
    layer: int
    delta: int  # +1: keep one more KV group in the layer; −1: one fewer


class GroupMoves:
    """The queue of moves still to visit and the paired differences seen since the centre moved."""

    def __init__(self):
        self.stats: dict[tuple[int, int], list[float]] = {}  # (layer, delta) -> per-window differences
        self.queue: list[tuple[int, int]] = []
        self.quiet_rounds = 0  # full rounds over the moves that found none worth taking
        self.round_open = False  # a round over the moves is under way and no move was taken in it

    @property
    def exhausted(self) -> bool:
        return self.quiet_rounds >= GROUP_ROUNDS

    def next(self, n: int, feasible: list[GroupMove], generator: torch.Generator) -> list[GroupMove]:
        """Up to ``n`` moves to evaluate next; a new round starts when the queue runs short."""
        allowed = {(m.layer, m.delta) for m in feasible}
        self.queue = [mv for mv in self.queue if mv in allowed]
        if len(self.queue) < n:
            if self.round_open:
                self.quiet_rounds += 1  # a whole round went by without a move
            self.round_open = True
            fresh = sorted(allowed)
            order = torch.randperm(len(fresh), generator=generator).tolist()
            self.queue += [fresh[i] for i in order]
        chosen, self.queue = self.queue[:n], self.queue[n:]
        return [GroupMove(layer, delta) for layer, delta in chosen]

    def add(self, moves: list[GroupMove], differences: torch.Tensor) -> None:
        """Record each move's per-window loss differences against the centre (rows of ``differences``)."""
        for mv, row in zip(moves, differences.tolist()):
            if all(math.isfinite(x) for x in row):
                self.stats.setdefault((mv.layer, mv.delta), []).extend(row)

    def decide(self) -> GroupMove | None:
        """The move with the lowest mean per-window difference, if it is below −GROUP_Z pooled
        standard errors."""
        stats = {k: torch.tensor(d, dtype=torch.float64) for k, d in self.stats.items() if d}
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

    def restart(self) -> None:
        """The centre moved: earlier differences no longer apply."""
        self.stats.clear()
        self.queue.clear()
        self.quiet_rounds, self.round_open = 0, False

    def state(self) -> dict:
        return {"group_stats": {f"{k[0]},{k[1]}": list(v) for k, v in self.stats.items()},
                "move_queue": [list(m) for m in self.queue], "quiet_rounds": self.quiet_rounds,
                "round_open": self.round_open}

    def load_state(self, state: dict) -> None:
        self.stats = {tuple(int(x) for x in k.split(",")): list(v) for k, v in state["group_stats"].items()}
        self.queue = [tuple(m) for m in state["move_queue"]]
        self.quiet_rounds, self.round_open = state["quiet_rounds"], state["round_open"]
