"""Atomic file writes (a crash at any moment leaves either the old file or the new one, never half)
and exclusive locks that die with their process."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from ofe.errors import OfeError


class DiskFullError(OfeError):
    """A write failed because the disk (or the user's quota) is full."""


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Turn a full disk or quota while writing ``path`` into one :class:`DiskFullError` line."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"cannot write {path}: {os.strerror(e.errno).lower()}; free some space and "
                                "re-run (with --resume for a run)") from None
        raise


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: a crash leaves the old file intact.
    A full disk is a :class:`DiskFullError` naming ``path``; the old file is left as it was."""
    with disk_errors(path):
        _atomic_write(path, write)


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class LockHeld(Exception):
    """Another process holds the lock; ``pid`` is what it wrote into the lock file."""

    def __init__(self, pid: str) -> None:
        super().__init__(f"held by pid {pid}")
        self.pid = pid


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed, our pid written in it) for the block.

    Raises :class:`LockHeld` at once, without waiting, if another process holds it. The lock dies
    with the process, so a killed holder never leaves a stale lock.
    """
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise LockHeld(handle.read().strip() or "unknown") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


PAUSE_ENV = "OFE_PAUSE_AT"


def pause_point(name: str) -> None:
    """A named instant at which tests kill the process with a real signal.

    When ``$OFE_PAUSE_AT`` equals ``name`` the process says so on stderr and stops itself
    (``SIGSTOP``), so a test can send ``SIGKILL`` or ``SIGINT`` (then ``SIGCONT``) at exactly this
    instant, with no sleep-based race. A no-op otherwise."""
    if os.environ.get(PAUSE_ENV) == name:
        print(f"ofe: paused at {name}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
