"""Run folders: what every job (prune, baseline, compact, recover) writes and reads back the same
way, and the contract that keeps a user's files safe.

- Files are written atomically (a temporary file beside the target, fsynced, then renamed).
- A folder bpp creates holds a manifest (``.bpp-run.json``: the job, and every file bpp wrote
  there). ``--force`` replaces only those files, and refuses a folder bpp did not write, the
  current folder or one above it, and a folder that holds the model being pruned. Nothing is
  removed before every input has been checked.
- A manifest is data from a folder that may have been crafted: every name it lists must be a
  plain name inside the folder, one the job writes, and not a symlink; a listed folder must be a
  model folder bpp wrote holding only its own files. Anything else is refused before anything
  is removed. Files a resumed run reads or appends to must not be symlinks.
- One writer at a time: ``flock`` on an open lock file, held for the job's life and released by
  the system when the process ends; the file also records the writer's PID and host.
- Temporary files and folders an interrupted run left behind (under the names of the files the
  manifest lists) are removed on the next start.
- Checkpoints load with ``torch.load(weights_only=True)``: tensors, numbers, strings and plain
  containers only, so a crafted file cannot run code.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

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
        tmp.unlink(missing_ok=True)  # a symlink planted under the temporary name is not followed
        with io_errors(tmp):
            write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:
            e.filename = str(path)
        raise
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


class io_errors:
    """A context in which a library's failed write (safetensors' SafetensorError, torch's
    RuntimeError from its file writer) is raised as the OSError it wraps, naming ``path``, so
    that a full disk is reported like any other failed write."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or isinstance(e, OSError) or not isinstance(e, Exception):
            return False
        text = str(e)
        io_failure = type(e).__name__ == "SafetensorError" and "IoError" in text or \
            isinstance(e, RuntimeError) and ("file write failed" in text or "PytorchStreamWriter" in text)
        if not io_failure:
            return False
        code = re.search(r"code: (\d+)", text)
        number = int(code.group(1)) if code else errno.ENOSPC if "StorageFull" in text else errno.EIO
        raise OSError(number, os.strerror(number), self.path) from None


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path, what: str, kind: type = dict):
    """A JSON file bpp wrote, or a one-line error naming it."""
    if Path(path).is_symlink():
        raise BppError(f"{path} is a symlink, not {what} bpp wrote; refusing to read it")
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BppError(f"cannot read {what} {path}: {e}") from None
    if not isinstance(value, kind):
        raise BppError(f"{path} is not {what} (a JSON {kind.__name__} was expected)")
    return value


def read_jsonl(path: str | os.PathLike, what: str = "records") -> list[dict]:
    """The records of a JSON-lines file bpp appends to (one object a line). A last line cut short
    (the disk filled up, or the process was killed while appending) is dropped; any other line
    that is not a JSON object is refused with a one-line error naming the file and line."""
    path = Path(path)
    if path.is_symlink():
        raise BppError(f"{path} is a symlink, not {what} bpp wrote; refusing to read it")
    try:
        lines = path.read_text().split("\n")
    except (OSError, ValueError) as e:
        raise BppError(f"cannot read {what} {path}: {first_line(e)}") from None
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if i == len(lines) - 1:  # no newline after it: a torn append
                break
            raise BppError(f"{path} line {i + 1} is not a JSON object: the file is corrupt; "
                           f"remove it or start a new run")
        records.append(record)
    return records


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


# --- configurations ---------------------------------------------------------------------------

def differences(saved: dict, now: dict, saved_name: str = "checkpoint") -> list[str]:
    """``name: saved != now`` for every key whose value differs."""
    return [f"{k}: {saved.get(k)!r} ({saved_name}) vs {v!r} (now)" for k, v in now.items() if saved.get(k) != v]


# --- one writer at a time ---------------------------------------------------------------------

def _alive(pid: int) -> bool:
    if pid <= 0:  # 0 and -1 would address process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Lock:
    """An exclusive lock: ``flock`` on the open lock file, held until :meth:`release` or until the
    process ends (the system releases it then, so a dead writer's lock needs no guessing). The
    file records the owner's PID, host and job; a file whose recorded owner is another live
    process on this host, or a process on another host, is respected even when not flocked (a
    writer of an older bpp, or one on a network file system)."""

    def __init__(self, path: Path, job: str):
        self.path, self.job, self.held = Path(path), job, False
        self.fd: int | None = None

    def acquire(self) -> "Lock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "job": self.job, "since": time.time()}
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise BppError(f"{self.path} is a symlink; bpp's lock file must be a plain file, remove it") \
                        from None
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._read(fd)
                os.close(fd)
                raise self._busy(owner) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                # the file may have been removed (by a releasing owner) between open and flock
                held = os.fstat(fd)
                now = os.stat(self.path, follow_symlinks=False)
                same = (held.st_ino, held.st_dev) == (now.st_ino, now.st_dev)
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            owner = self._read(fd)
            if owner is not None and owner.get("pid") != me["pid"] and \
                    (owner.get("host") != me["host"] or _alive(_int(owner.get("pid")))):
                os.close(fd)
                raise self._busy(owner)
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            self.fd, self.held = fd, True
            return self
        raise BppError(f"could not take the lock {self.path}; remove it if no bpp job is running")

    def _busy(self, owner: dict | None) -> BppError:
        owner = owner or {}
        who = f"process {owner.get('pid')} on {owner.get('host')}" if owner.get("pid") is not None \
            else "a process that is starting"
        return BppError(f"{self.path.parent} is in use by another bpp {owner.get('job', 'job')} ({who}); wait for "
                        f"it to finish, or remove {self.path} if that process is gone")

    @staticmethod
    def _read(fd: int) -> dict | None:
        try:
            owner = json.loads(os.pread(fd, 4096, 0) or b"null")
            return owner if isinstance(owner, dict) else None
        except (OSError, ValueError):
            return None  # empty or half-written: its writer holds the flock, or is gone

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiter then finds no file, or a new one
            os.close(self.fd)
            self.fd, self.held = None, False


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


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


def _plain_name(name) -> bool:
    """A file name bpp writes: one path component, not ``.``, ``..`` or bpp's own bookkeeping."""
    return isinstance(name, str) and name not in ("", ".", "..", MANIFEST, LOCK) \
        and not any(c in name for c in "/\\\0")


_TEMP_SUFFIX = re.compile(r"-[A-Za-z0-9_]+(\.tmp)?")  # the random part of tempfile.mkstemp / mkdtemp


def clean_partials(folder: Path, names: Iterable[str]) -> None:
    """Remove what an interrupted bpp run left in ``folder`` while writing one of ``names``: the
    temporary file of an atomic write (``.NAME.tmp``), a temporary file or folder made by
    ``tempfile`` (``.NAME-XXXXXXXX[.tmp]``; a folder only when marked as partial) and an old model
    folder being replaced (``.NAME.old-PID``, holding bpp's model manifest). Other entries,
    symlinks included, are left alone."""
    if not folder.is_dir():
        return
    names = {n for n in names if _plain_name(n) or n == MANIFEST}
    for entry in folder.iterdir():
        n = entry.name
        if not n.startswith(".") or entry.is_symlink():
            continue
        for name in names:
            stem = n[1 + len(name):] if n.startswith(f".{name}") else None
            if stem is None:
                continue
            if entry.is_file() and (stem == ".tmp" or (_TEMP_SUFFIX.fullmatch(stem) and stem.endswith(".tmp"))):
                entry.unlink(missing_ok=True)
            elif entry.is_dir() and _TEMP_SUFFIX.fullmatch(stem) and (entry / PARTIAL_MARKER).is_file():
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_dir() and re.fullmatch(r"\.old-\d+", stem) and _is_model_manifest(entry):
                shutil.rmtree(entry, ignore_errors=True)
            else:
                continue
            break


def _is_model_manifest(folder: Path) -> bool:
    try:
        manifest = read_manifest(folder)
    except BppError:
        return False
    return manifest is not None and manifest.get("job") == "model"


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file() and not path.is_symlink():
        return None
    return read_json(path, "the bpp manifest")


def _manifest_files(folder: Path, manifest: dict) -> list:
    files = manifest.get("files", [])
    if not isinstance(files, list):
        raise BppError(f"{folder / MANIFEST} is not a bpp manifest (its files are not a list); refusing to use it")
    return files


def model_folder_files(folder: Path) -> list[str]:
    """The files of a model folder bpp wrote, as its manifest lists them, once checked: plain
    names, no symlinks, nothing else in the folder. Anything else is a one-line error."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("job") != "model":
        what = f"a bpp {manifest.get('job')} run" if manifest else "not a model folder bpp wrote"
        raise BppError(f"{folder} is {what}; --force replaces only a model folder bpp wrote, so give another --out")
    files = _manifest_files(folder, manifest)
    for name in files:
        if not _plain_name(name):
            raise BppError(f"{folder / MANIFEST} lists {name!r}, which is not a file name inside {folder}; "
                           "refusing to remove anything")
        if (folder / name).is_symlink() or ((folder / name).exists() and not (folder / name).is_file()):
            raise BppError(f"{folder / name} is not a plain file; bpp writes none such, so it removes nothing "
                           f"in {folder}: move it out or give another --out")
    foreign = sorted(e.name for e in folder.iterdir() if e.name not in set(files) | {MANIFEST})
    if foreign:
        raise BppError(f"{folder} holds files bpp did not write ({', '.join(foreign[:5])}); move them out or give "
                       "another --out")
    return files


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
        if out.is_symlink() and not out.exists():
            raise BppError(f"{out} is a symlink to nothing; give a folder for the output")
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
            manifest = read_manifest(self.path)
            if manifest is not None:
                clean_partials(self.path, [MANIFEST, *_manifest_files(self.path, manifest)])
        except BaseException:
            self.close(ok=False)
            raise
        return self

    def claim(self, *, force: bool = False, resume: bool = False, files: tuple[str, ...] = (),
              patterns: tuple[str, ...] = ()) -> "RunFolder":
        """Take the folder for this run: on ``force``, remove what the manifest lists; then a new
        manifest naming ``files`` (the files the job writes; ``patterns``: regular expressions of
        the names it may also record). On ``resume``, keep everything.

        Every name the manifest lists is checked first (a plain name inside the folder that the
        job writes, not a symlink; a folder only when it is a model folder bpp wrote, holding
        nothing else), as is every file the job writes (not a symlink; with ``force``, not a file
        the manifest does not list): anything else is a one-line error, and nothing is removed."""
        manifest = read_manifest(self.path)
        listed = self._checked(manifest, files, patterns) if manifest is not None else []
        for name in files:
            target = self.path / name
            if target.is_symlink():
                raise BppError(f"{target} is a symlink; bpp never writes one and does not write through it: "
                               "remove it, or give another --out")
            if force and not resume and name not in listed and target.exists():
                raise BppError(f"{target} exists but {self.path / MANIFEST} does not list it, so bpp did not write "
                               "it; --force replaces only bpp's own files: move it out, or give another --out")
        if manifest is not None and resume:
            self.files = list(listed)
        elif manifest is not None and force:
            for name in listed:
                target = self.path / name
                if target.is_dir():
                    for inner in model_folder_files(target):
                        (target / inner).unlink(missing_ok=True)
                    (target / MANIFEST).unlink(missing_ok=True)
                    target.rmdir()
                else:
                    target.unlink(missing_ok=True)
        self.files = list(dict.fromkeys([*self.files, *files]))
        self._write_manifest()
        return self

    def _checked(self, manifest: dict, files: tuple[str, ...], patterns: tuple[str, ...]) -> list[str]:
        """The names ``manifest`` lists, each checked (see :meth:`claim`)."""
        where = self.path / MANIFEST
        listed = _manifest_files(self.path, manifest)
        for name in listed:
            if not _plain_name(name):
                raise BppError(f"{where} lists {name!r}, which is not a file name inside {self.path}; refusing to "
                               "use it (remove the folder yourself, or give another --out)")
            if name not in files and not any(re.fullmatch(p, name) for p in patterns):
                raise BppError(f"{where} lists {name!r}, which a bpp {self.job} run does not write; refusing to "
                               "use it (remove the folder yourself, or give another --out)")
            target = self.path / name
            if target.is_symlink():
                raise BppError(f"{target} is a symlink; bpp never writes one, so it neither removes it nor writes "
                               "through it: remove it yourself, or give another --out")
            if target.is_dir():
                model_folder_files(target)
            elif target.exists() and not target.is_file():
                raise BppError(f"{target} is not a plain file; bpp writes none such: move it out, or give "
                               "another --out")
        return listed

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
    """The lock of an output written under a temporary name and renamed into place (a model
    folder, a GGUF file): beside it, since the output itself is replaced whole."""
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
    model_folder_files(out)
