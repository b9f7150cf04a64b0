"""One writer at a time: ``flock`` on an open lock file, held for the job's life and released by
the system when the process ends; the file also records the writer's PID, host and job."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import BppError

LOCK = ".bpp-lock"


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

    def __init__(self, path: Path, job: str, guards: Path | None = None):
        """``guards``: what the lock keeps to one writer (default: the folder the lock file is in)."""
        self.path, self.job, self.held = Path(path), job, False
        self.guards = Path(guards) if guards is not None else self.path.parent
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
        return BppError(f"{self.guards} is in use by another bpp {owner.get('job', 'job')} ({who}); wait for "
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
