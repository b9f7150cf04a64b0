"""Masks per second of `bpp prune` with 1 process vs N torchrun processes (gloo on CPU, NCCL on GPUs).

Each configuration runs a short prune of the embedded default (uniform init, no evaluation) and
reads the policy-gradient time per step from its report. On CPU the cores are split between the
ranks (OMP_NUM_THREADS = cores / ranks), so the comparison is at equal hardware.

    .venv/bin/python bench/distributed.py [--procs 1,2] [--steps 4] [--samples 8] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", default="1,2")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    for n in (int(x) for x in a.procs.split(",")):
        out = Path(tempfile.mkdtemp(prefix=f"bpp-dist-{n}-")) / "run"
        args = ["prune", "--steps", str(a.steps), "--samples", str(a.samples), "--batch-size", str(a.batch_size),
                "--init", "uniform", "--no-eval", "--quiet", "--checkpoint-every", "0", "--device", a.device,
                "--out", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // n)) if a.device == "cpu" else "1")
        cmd = [sys.executable, "-m", "bpp", *args] if n == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "-m", "bpp", *args]
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        report = json.loads((out / "report.json").read_text())
        per_step = report["timings_s"]["per_step"]
        rows.append((n, env["OMP_NUM_THREADS"], per_step, a.samples / per_step))
        print(f"  {n} process(es): {per_step:.2f} s/step", file=sys.stderr)
    print(f"\n{a.device}, {cores} cores; SmolLM2-135M-Instruct, S={a.samples}, batch {a.batch_size}×128, "
          f"{a.steps} steps\n")
    print("| processes | threads each | s per step | masks/s | × 1 process |")
    print("|---|---|---|---|---|")
    for n, threads, per_step, mps in rows:
        print(f"| {n} | {threads} | {per_step:.2f} | {mps:.2f} | {mps / rows[0][3]:.2f}× |")


if __name__ == "__main__":
    main()
