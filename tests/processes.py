"""Processes of a test's subprocess, read from Linux's /proc: who is below a pid, and waiting until
killed processes have really exited (their files, and so their run locks, closed)."""

import time
from pathlib import Path


def _stat_fields(pid: int | str) -> list[str]:
    """``/proc/PID/stat`` after the command name: state, parent pid, ... (raises OSError when gone)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's workers, a sweep's workers and its resource tracker)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(_stat_fields(stat.parent.name)[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def exited(pid: int) -> bool:
    """Whether ``pid`` is gone, or a zombie with every thread gone or a zombie too: only then are its
    files closed. (A killed many-threaded process shows its leader as a zombie while its other threads
    still tear down, holding the shared files, a run's lock among them.)"""
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
                return False
        except (OSError, IndexError):
            continue
    return True


def wait_exited(pids: list[int], timeout: float, what: str) -> None:
    """Return once every one of ``pids`` has exited; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not all(exited(pid) for pid in pids):
        assert time.monotonic() < deadline, f"{what} still running after {timeout:g} s"
        time.sleep(0.05)
