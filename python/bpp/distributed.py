"""Scale-out on PyTorch's own distributed stack (launch with ``torchrun``; no launcher of ours).

Every rank draws the same S masks (same seed) and holds the same θ; each evaluates a contiguous
share of the masks with the batched engine; the losses are all-gathered, and every rank applies
the identical update, so θ stays bit-identical across ranks and equal to a single-process run
(a mask's loss does not depend on which other masks share its pass). Rank 0 alone writes
checkpoints and outputs; a checkpoint resumes on any number of ranks.

If a rank dies, torchrun stops the others and the job exits non-zero; resume from the last
checkpoint with ``--resume DIR`` on any number of processes.
"""
from __future__ import annotations

import datetime
import os

import torch

from .masks import Masks


def setup(device: str = "cpu") -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on CUDA)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size()


def shard(S: int, rank: int, world_size: int) -> slice:
    per = -(-S // world_size)
    return slice(min(rank * per, S), min((rank + 1) * per, S))


class ShardedLosses:
    """Wraps a losses function ``(input_ids, masks) -> (S,)``: this rank evaluates its share of
    the masks, and every rank gets all S losses."""

    def __init__(self, losses_fn, rank: int, world_size: int):
        self.losses_fn, self.rank, self.world_size = losses_fn, rank, world_size

    def __call__(self, input_ids: torch.Tensor, masks: Masks) -> torch.Tensor:
        import torch.distributed as dist

        S = masks.S
        per = -(-S // self.world_size)
        mine = shard(S, self.rank, self.world_size)
        padded = torch.full((per,), float("nan"), dtype=torch.float32, device=input_ids.device)
        if mine.stop > mine.start:
            padded[: mine.stop - mine.start] = self.losses_fn(input_ids, masks[mine]).float()
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        return torch.cat(gathered)[:S]
