"""Atomic file writes (a crash at any moment leaves either the old file or the new one, never half),
exclusive locks that die with their process, and appends; none of them writes through a symbolic
link (a link at a path ofe would write is refused with one line naming it)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ofe.errors import OfeError


class DiskFullError(OfeError):
    """A write failed because the disk (or the user's quota) is full."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # EFBIG: a file-size limit (ulimit -f) or the file system's maximum


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Turn a full disk, a quota or a file-size limit while writing ``path`` into one
    :class:`DiskFullError` line (torch reports a failed write of its own as a ``RuntimeError``)."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL:
            raise DiskFullError(f"cannot write {path}: {os.strerror(e.errno).lower()}; free some space (or raise the "
                                "file-size limit) and re-run (with --resume for a run)") from None
        raise
    except RuntimeError as e:
        message = str(e).strip()
        if "write failed" not in message and "unexpected pos" not in message:
            raise
        raise DiskFullError(f"cannot write {path}: the write failed ({message.splitlines()[0]}); the disk is probably "
                            "full or the file over a size limit: free some space and re-run (with --resume for a "
                            "run)") from None


class UnsafePath(OfeError):
    """A path ofe will not write through: a symbolic link where ofe writes its own file."""


TMP_SUFFIX = ".tmp"
_OWN_TMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # .NAME.XXXXXXXX.tmp: what atomic_write creates


def directory_mode() -> int:
    """The mode ``mkdir`` would give a new directory under this process's umask (``mkdtemp`` gives 0700,
    which would keep a shared cache from the other users of a machine)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def is_own_temporary(name: str) -> bool:
    """Whether ``name`` is of the pattern :func:`atomic_write`'s temporaries have."""
    return bool(_OWN_TMP.match(name))


def output_folder_problem(out: Path, own: list[Path], record: str, keys: set[str], lock: str, what: str) -> str | None:
    """Why ``out`` cannot receive a command's output, or None: it may be new, empty (but for its ``lock``
    and our temporaries) or an earlier output of the same command, told by its JSON ``record`` holding
    ``keys``; none of the paths in ``own`` (the files the command writes) may be a symbolic link."""
    if links := [str(p) for p in own if p.is_symlink()]:
        return f"{links[0]} is a symbolic link; ofe does not write through links: remove it or choose another --out_dir"
    if not out.exists():
        return None
    if not out.is_dir():
        return f"{out} exists and is not a directory; choose another --out_dir"
    if not [p for p in out.iterdir() if p.name != lock and not is_own_temporary(p.name)]:
        return None  # new, or a first output killed before its files
    try:
        previous = json.loads((out / record).read_text())
        ours = isinstance(previous, dict) and keys <= set(previous)
    except (OSError, ValueError):
        ours = False
    return None if ours else f"{out} exists and is not an ofe {what} (no {record} of ours); choose another --out_dir"


def refuse_link(path: Path) -> None:
    """Raise :class:`UnsafePath` when ``path`` is a symbolic link (writing there would write elsewhere)."""
    if path.is_symlink():
        raise UnsafePath(f"{path} is a symbolic link; ofe does not write through links: remove it or choose another "
                         "output directory")


def clean_stale_temporaries(folder: Path) -> list[str]:
    """Remove the temporary files an interrupted :func:`atomic_write` left in ``folder`` (only names of
    its own pattern; a link is removed, never followed). Returns the names removed."""
    removed = []
    for entry in folder.iterdir() if folder.is_dir() else ():
        if _OWN_TMP.match(entry.name) and (entry.is_symlink() or entry.is_file()):
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def _open_nofollow(path: Path, flags: int) -> int:
    """``os.open(path, flags | O_CREAT | O_NOFOLLOW)``; a symbolic link is :class:`UnsafePath`."""
    try:
        return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_link(path)
        raise


def open_append(path: Path):
    """``path`` opened for appending text, created if needed; a symbolic link is refused (O_NOFOLLOW)."""
    return os.fdopen(_open_nofollow(path, os.O_WRONLY | os.O_APPEND), "a")


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: a crash leaves the old file intact.
    A full disk is a :class:`DiskFullError` naming ``path``; the old file is left as it was."""
    with disk_errors(path):
        try:
            _atomic_write(path, write)
        except OSError as e:  # name the file the user asked for, not its hidden temporary
            if e.filename and is_own_temporary(Path(str(e.filename)).name):
                raise OSError(e.errno, e.strerror, str(path)) from None
            raise


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    refuse_link(path)
    # a fresh, unique temporary (O_CREAT | O_EXCL | O_NOFOLLOW): a file or link planted at a predictable
    # name can neither be overwritten nor followed
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
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
    with os.fdopen(_open_nofollow(path, os.O_RDWR), "r+") as handle:
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
