"""Run folders: what every job (prune, baseline, compact, recover) writes and reads back the same
way — atomic files, checkpoints, fingerprints of what a resumed run must find unchanged, the
preparation of an output folder, and the comparison of a run's saved options with new ones."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from .errors import BppError

CHECKPOINT = "checkpoint.pt"


def fingerprint(t: torch.Tensor) -> str:
    """A short hash of a tensor's bytes (the calibration windows a run must find unchanged)."""
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, flushed to disk, then renamed over
    ``path``: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write a checkpoint atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by :func:`save_checkpoint`."""
    return torch.load(Path(path), weights_only=False, map_location="cpu")


def prepare_out_dir(out: Path, force: bool, owned: tuple[str, ...]) -> None:
    """Make ``out`` ready for a new run: create it, or, with ``force``, remove the files of
    ``owned`` (and a ``model/`` folder) that an earlier run wrote there."""
    if out.exists() and not out.is_dir():
        raise BppError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise BppError(f"{out} already exists and is not empty; pass --force to overwrite it, "
                           "or --resume to continue the run in it")
        for name in owned:
            (out / name).unlink(missing_ok=True)
        if (out / "model" / "config.json").is_file():
            shutil.rmtree(out / "model")
    out.mkdir(parents=True, exist_ok=True)


def differences(saved: dict, now: dict, saved_name: str = "checkpoint") -> list[str]:
    """``name: saved != now`` for every key whose value differs."""
    return [f"{k}: {saved.get(k)!r} ({saved_name}) vs {v!r} (now)" for k, v in now.items() if saved.get(k) != v]
