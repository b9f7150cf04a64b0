"""Checkpoints: saved atomically, loaded with ``torch.load(weights_only=True)`` (tensors, numbers,
strings and plain containers only, so a crafted file cannot run code), with one-line errors for
damaged or malformed ones; the RNG states a resumed run restores, and the fingerprint and
configuration differences a resumed run is checked against."""
from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from pathlib import Path

import torch

from .errors import BppError, first_line
from .fileio import atomic_write

CHECKPOINT = "checkpoint.pt"


def fingerprint(t: torch.Tensor) -> str:
    """A short hash of a tensor's bytes (the calibration windows a run must find unchanged)."""
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write a checkpoint atomically. ``state`` holds only what ``weights_only`` loading accepts:
    tensors, numbers, strings, None and (nested) dicts, lists and tuples."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # through a Python file: a full disk raises OSError(ENOSPC)
            torch.save(state, f)

    return atomic_write(path, write)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by :func:`save_checkpoint`, loaded without running any code from it."""
    path = Path(path)
    if path.is_symlink():
        raise BppError(f"{path} is a symlink, not a checkpoint bpp wrote; refusing to read it")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it will refuse anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise BppError(f"{path} is not a bpp checkpoint: it holds objects other than tensors and plain data "
                       f"({first_line(e)}); refusing to load it. Start a new run instead") from None
    except (EOFError, RuntimeError, OSError, ValueError) as e:
        raise BppError(f"{path} is unreadable (truncated or corrupt: {first_line(e, 120)}); "
                       "start a new run with --force") from None
    if not isinstance(state, dict):
        raise BppError(f"{path} is not a bpp checkpoint")
    return state


class malformed_checkpoint:
    """A context in which reading the fields of the checkpoint ``path`` (a missing key, a string
    where a dict belongs, ...) raises a one-line BppError naming the file instead of KeyError,
    AttributeError, TypeError, ValueError or IndexError."""

    def __init__(self, path: str | os.PathLike):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if isinstance(e, (KeyError, AttributeError, TypeError, ValueError, IndexError)):
            detail = f"missing {e}" if isinstance(e, KeyError) else first_line(e, 120)
            raise BppError(f"{self.path} is not a usable bpp checkpoint ({type(e).__name__}: {detail}); "
                           "start a new run with --force") from None
        return False


def rng_state() -> dict:
    """The global torch, Python and NumPy RNG states, as checkpoint-safe values."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))}


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def differences(saved: dict, now: dict, saved_name: str = "checkpoint") -> list[str]:
    """``name: saved != now`` for every key whose value differs."""
    return [f"{k}: {saved.get(k)!r} ({saved_name}) vs {v!r} (now)" for k, v in now.items() if saved.get(k) != v]
