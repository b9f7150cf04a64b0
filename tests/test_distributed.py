"""torchrun with the gloo backend on CPU: 2 ranks give the single-process result bit for bit, a
dead rank stops the job, and its last checkpoint resumes on another number of processes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bpp.distributed import shard
from bpp.masks import Masks
from tests.conftest import kill_9_at_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


UNITS = ("--policy", "units", "--no-bias-compensation", "--incumbent-every", "0")  # the official per-unit policy


def _args(tiny_qwen2_dir, out, steps, policy=UNITS):
    return ["prune", "--model", str(tiny_qwen2_dir), "--steps", str(steps), "--samples", "4", "--batch-size", "1",
            "--seq-len", "16", "--init-windows", "2", "--init-seq-len", "16", "--sparsity", "0.3",
            "--checkpoint-every", "25", "--no-eval", "--quiet", "--seed", "3", "--out", str(out), *policy]


def _torchrun(n, args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
            str(29500 + os.getpid() % 1000), "-m", "bpp", *args]


def _same(a: Path, b: Path):
    for name in ("theta.safetensors", "mask.safetensors"):
        if name == "theta.safetensors" and not (a / name).exists():  # the allocation policy: its own file
            assert (a / "allocation.json").read_text() == (b / "allocation.json").read_text()
            continue
        x, y = Masks.load(a / name), Masks.load(b / name)
        assert x == y, name


def test_shard_covers_every_sample_once():
    for S in (1, 2, 7, 8):
        for world in (1, 2, 3):
            parts = [shard(S, r, world) for r in range(world)]
            assert sum(p.stop - p.start for p in parts) == S
            assert [i for p in parts for i in range(p.start, p.stop)] == list(range(S))


@pytest.mark.parametrize("policy", [UNITS, ("--group-every", "2", "--incumbent-every", "10", "--init", "flap")],
                         ids=["units", "allocation"])
def test_two_ranks_equal_one_process(tiny_qwen2_dir, tmp_path, policy):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "bpp", *_args(tiny_qwen2_dir, one, 30, policy)], check=True, env=ENV,
                   cwd=REPO, capture_output=True, timeout=300)
    out = subprocess.run(_torchrun(2, _args(tiny_qwen2_dir, two, 30, policy)), env=ENV, cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    _same(one, two)
    import json

    assert json.loads((two / "report.json").read_text())["world_size"] == 2


def _workers(parent: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun ``parent`` started (its descendants with a RANK)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found, todo = {}, list(children.get(parent, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        rank = next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)
        if rank is not None and rank not in found:
            found[rank] = pid
    return found


def test_dead_rank_stops_the_job_and_the_checkpoint_resumes_on_one_process(tiny_qwen2_dir, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run([sys.executable, "-m", "bpp", *_args(tiny_qwen2_dir, ref, 600)], check=True, env=ENV, cwd=REPO,
                   capture_output=True, timeout=600)
    proc = subprocess.Popen(_torchrun(2, _args(tiny_qwen2_dir, cut, 600)), env=ENV, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: dict[int, int] = {}

    def pause() -> list[int]:  # both ranks stop while the checkpoint is read
        workers.clear()
        workers.update(_workers(proc.pid))
        return list(workers.values())

    # rank 1 dies; rank 0 resumes and must find its peer gone
    killed_at = kill_9_at_checkpoint(proc, cut / "checkpoint.pt", 50, finished=cut / "mask.safetensors",
                                     pause=pause, kill=lambda paused: [workers[1]] if 1 in workers else [],
                                     timeout=300)
    assert 50 <= killed_at < 600 and proc.returncode != 0 and not (cut / "mask.safetensors").exists()
    subprocess.run([sys.executable, "-m", "bpp", "prune", "--resume", str(cut), "--quiet", "--no-eval"],
                   check=True, env=ENV, cwd=REPO, capture_output=True, timeout=600)
    _same(ref, cut)
