"""Files written so that a reader never sees half of one (a temporary file beside the target,
fsynced, then renamed), JSON and JSON-lines files read back with one-line errors, and failed
writes reported as one line."""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import BppError, first_line


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
