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

import os
import re
import shutil
from pathlib import Path
from typing import Iterable

from .errors import BppError
from .fileio import atomic_write_json, read_json
from .locks import LOCK, Lock

MANIFEST = ".bpp-run.json"
PARTIAL_MARKER = ".bpp-partial"  # inside a temporary folder bpp is filling


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
    return Lock(out.parent / f".{out.name}.bpp-lock", job, guards=out)


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
