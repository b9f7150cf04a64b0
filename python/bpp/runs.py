"""Run folders: what every job (prune, baseline, compact, recover) writes and reads back the same
way, and the contract that keeps a user's files safe.

- Files are written atomically (a temporary file beside the target, fsynced, then renamed).
- A folder bpp creates holds a manifest (``.bpp-run.json``: the job, and every file bpp wrote
  there). ``--force`` replaces only those files, and refuses a folder bpp did not write, the
  current folder or one above it, and a folder that holds the model being pruned. Nothing is
  removed before every input has been checked.
- One writer at a time: a lock file holding the writer's PID; a lock whose process is gone is
  stale and taken over.
- Temporary files and folders an interrupted run left behind are removed on the next start.
- Checkpoints load with ``torch.load(weights_only=True)``: tensors, numbers, strings and plain
  containers only, so a crafted file cannot run code.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import BppError, first_line

CHECKPOINT = "checkpoint.pt"
MANIFEST = ".bpp-run.json"
LOCK = ".bpp-lock"
PARTIAL_MARKER = ".bpp-partial"  # inside a temporary folder bpp is filling


def fingerprint(t: torch.Tensor) -> str:
    """A short hash of a tensor's bytes (the calibration windows a run must find unchanged)."""
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


# --- files ------------------------------------------------------------------------------------

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


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary path beside ``path`` (a unique name, created empty, readable by its owner only) for the caller
    to write, e.g. a large file streamed piece by piece; when the block ends it is flushed to
    disk, renamed over ``path`` and the rename synced. On an error it is removed and ``path``
    left as it was."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still done
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path, what: str, kind: type = dict):
    """A JSON file bpp wrote, or a one-line error naming it."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BppError(f"cannot read {what} {path}: {e}") from None
    if not isinstance(value, kind):
        raise BppError(f"{path} is not {what} (a JSON {kind.__name__} was expected)")
    return value


def write_error(e: OSError, what: str | os.PathLike) -> BppError:
    """A one-line error for a failed file operation (full disk, read-only file system, no
    permission, ...), naming the file."""
    reason = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
              errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}.get(
        e.errno, e.strerror or first_line(e))
    verb = "cannot write" if e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT) else "cannot access"
    return BppError(f"{verb} {getattr(e, 'filename', None) or what}: {reason}")


# --- checkpoints ------------------------------------------------------------------------------

def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write a checkpoint atomically. ``state`` holds only what ``weights_only`` loading accepts:
    tensors, numbers, strings, None and (nested) dicts, lists and tuples."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by :func:`save_checkpoint`, loaded without running any code from it."""
    path = Path(path)
    try:
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


# --- configurations ---------------------------------------------------------------------------

def differences(saved: dict, now: dict, saved_name: str = "checkpoint") -> list[str]:
    """``name: saved != now`` for every key whose value differs."""
    return [f"{k}: {saved.get(k)!r} ({saved_name}) vs {v!r} (now)" for k, v in now.items() if saved.get(k) != v]


# --- one writer at a time ---------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Lock:
    """An exclusive lock file: created with O_EXCL, holding the owner's PID and host. A lock left
    by a process that no longer exists (on this host) is stale and taken over."""

    def __init__(self, path: Path, job: str):
        self.path, self.job, self.held = Path(path), job, False

    def acquire(self) -> "Lock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "job": self.job, "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and (owner.get("host") != me["host"] or _alive(int(owner.get("pid", -1)))):
                    raise BppError(f"{self.path.parent} is in use by another bpp {owner.get('job', 'job')} "
                                   f"(process {owner.get('pid')} on {owner.get('host')}); wait for it to finish, "
                                   f"or remove {self.path} if that process is gone") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise BppError(f"could not take the lock {self.path}; remove it if no bpp job is running")

    def _owner(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else None
        except (OSError, ValueError):
            return None  # unreadable or half-written: treated as stale

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# --- the folders jobs write -------------------------------------------------------------------

def _is_within(inner: Path, outer: Path) -> bool:
    try:
        inner.relative_to(outer)
        return True
    except ValueError:
        return False


def check_target(out: Path, protected: tuple = ()) -> None:
    """Refuse an output folder that is the current folder or one above it, or that is, or holds,
    one of the ``protected`` inputs (the model folder being pruned)."""
    target = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if _is_within(cwd, target):
        raise BppError(f"--out {out} is the current folder or one above it; give a new folder for the output")
    for p in protected:
        if p is None:
            continue
        p = Path(p).expanduser()
        if not p.exists():
            continue
        p = p.resolve()
        if _is_within(p, target):
            raise BppError(f"--out {out} holds the input {p}; give a folder outside it for the output")


def clean_partials(folder: Path, prefix: str = ".") -> None:
    """Remove what an interrupted bpp run left in ``folder`` under names starting with ``prefix``:
    temporary files (``.*.tmp``), and temporary model folders (marked as partial, or old copies
    being replaced)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        n = entry.name
        if not n.startswith(prefix) or not n.startswith("."):
            continue
        if entry.is_file() and n.endswith(".tmp"):
            entry.unlink(missing_ok=True)
        elif entry.is_dir() and ((entry / PARTIAL_MARKER).is_file() or ".old-" in n):
            shutil.rmtree(entry, ignore_errors=True)


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return read_json(path, "the bpp manifest")


class RunFolder:
    """A run folder a job owns. ``check`` before any work (no side effects); ``open`` takes the
    lock (creating the folder if needed) and removes what an interrupted run left behind;
    ``claim``, once every input is validated, replaces the previous run's files (with ``force``)
    and writes the manifest; ``record`` notes the files written; ``close`` unlocks, and removes
    the folder again when it created it and the job failed before writing anything."""

    def __init__(self, path: str | os.PathLike, job: str):
        self.path = Path(path)
        self.job = job
        self.lock = Lock(self.path / LOCK, job)
        self.created = False
        self.files: list[str] = []

    def check(self, *, force: bool = False, resume: bool = False, protected: tuple = ()) -> None:
        out = self.path
        check_target(out, protected)
        if out.exists() and not out.is_dir():
            raise BppError(f"{out} exists and is not a folder")
        if resume or not out.exists():
            return
        if not [e for e in out.iterdir() if e.name != LOCK]:
            return
        manifest = read_manifest(out)
        if not force:
            raise BppError(f"{out} already exists and is not empty; pass --force to replace the files bpp wrote "
                           "there, or --resume to continue the run in it")
        if manifest is None:
            raise BppError(f"{out} was not written by bpp (no {MANIFEST}); --force replaces only bpp's own files, "
                           "so give a new --out (or empty it yourself)")
        if manifest.get("job") != self.job:
            raise BppError(f"{out} holds a bpp {manifest.get('job')} run, not a {self.job} run; give another --out")

    def open(self, *, force: bool = False, resume: bool = False, protected: tuple = ()) -> "RunFolder":
        self.check(force=force, resume=resume, protected=protected)
        if not self.path.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            self.created = True
        self.lock.acquire()
        try:
            self.check(force=force, resume=resume, protected=protected)  # again, now that no one else writes
            clean_partials(self.path)
        except BaseException:
            self.close(ok=False)
            raise
        return self

    def claim(self, *, force: bool = False, resume: bool = False, files: tuple[str, ...] = ()) -> "RunFolder":
        """Take the folder for this run: on ``force``, remove what the manifest lists; then a new
        manifest naming ``files`` (the files the job writes). On ``resume``, keep everything."""
        manifest = read_manifest(self.path)
        if manifest is not None and resume:
            self.files = list(manifest.get("files", []))
        elif manifest is not None and force:
            for name in manifest.get("files", []):
                target = self.path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        self.files = list(dict.fromkeys([*self.files, *files]))
        self._write_manifest()
        return self

    def _write_manifest(self) -> None:
        atomic_write_json(self.path / MANIFEST, {"tool": "bpp", "job": self.job, "files": self.files})

    def record(self, *names: str) -> None:
        """Note files (or folders) bpp wrote in the run folder."""
        new = [n for n in names if n not in self.files]
        if new:
            self.files.extend(new)
            self._write_manifest()

    def close(self, ok: bool) -> None:
        self.lock.release()
        if not ok and self.created and self.path.is_dir() \
                and not [e for e in self.path.iterdir() if e.name not in (MANIFEST, LOCK)]:
            shutil.rmtree(self.path, ignore_errors=True)


def model_folder_lock(out: Path, job: str) -> Lock:
    """The lock of a model folder written by temporary folder and rename: beside it, since the
    folder itself is replaced whole."""
    return Lock(out.parent / f".{out.name}.bpp-lock", job)


def check_model_folder_target(out: str | os.PathLike, *, force: bool, protected: tuple = ()) -> None:
    """Refuse to write a model folder over anything but an earlier bpp model folder (with
    ``force``), the current folder or one above it, or a folder holding an input."""
    out = Path(out)
    check_target(out, protected)
    if not out.exists():
        return
    if not out.is_dir():
        raise BppError(f"{out} exists and is not a folder")
    if not force:
        raise BppError(f"{out} exists; pass --force to replace it")
    if not any(out.iterdir()):
        return  # an empty folder: nothing to lose
    manifest = read_manifest(out)
    if manifest is None or manifest.get("job") != "model":
        what = f"a bpp {manifest.get('job')} run" if manifest else "not a model folder bpp wrote"
        raise BppError(f"{out} is {what}; --force replaces only a model folder bpp wrote, so give another --out")
    foreign = sorted(e.name for e in out.iterdir() if e.name not in set(manifest.get("files", [])) | {MANIFEST})
    if foreign:
        raise BppError(f"{out} holds files bpp did not write ({', '.join(foreign[:5])}); move them out or give "
                       "another --out")
