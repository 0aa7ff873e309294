"""One base class for every user-facing error of ``ofe``.

A user mistake (a bad config key, a missing corpus, a damaged run directory, a checkpoint from
another run, a model directory that cannot be audited) raises a subclass of :class:`OfeError`.
The command line catches :class:`OfeError` once and prints its message on one line with exit code
:attr:`OfeError.exit_code`; anything else is a bug in ``ofe`` and keeps its traceback.

The subclasses live with the concept they describe: ``ConfigError`` (:mod:`ofe.config`),
``RunDirError`` and ``CheckpointError`` (:mod:`ofe.run_dir`), ``CorpusError`` (:mod:`ofe.data`),
``TrainError`` and ``NonFiniteLoss`` (:mod:`ofe.train`), ``QuantError`` (:mod:`ofe.quant`),
``AuditError`` (:mod:`ofe.audit`), ``RunError`` (:mod:`ofe.analysis`), ``ReportError``
(:mod:`ofe.report`). ``tests/test_errors.py`` checks that every one derives from this class.
"""

from __future__ import annotations

import errno


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``timeout``, ``kill``) received by an ``ofe`` command: handled as Ctrl-C is
    (whatever cleans up on an interrupt runs), reported as "terminated" with exit code 143."""


class OfeError(Exception):
    """A user-facing problem: the message is one line that names what is wrong."""

    exit_code = 2


_OS_ADVICE = {
    errno.ENOENT: "no such file or directory: check the path",
    errno.EEXIST: "already exists: choose another name",
    errno.EISDIR: "is a directory where a file was expected",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EACCES: "permission denied: choose a path you can read and write, or change its permissions",
    errno.EPERM: "operation not permitted: choose another path",
    errno.ENAMETOOLONG: "the name is too long for the file system: choose a shorter path",
    errno.ELOOP: "too many levels of symbolic links (a link loop?)",
    errno.ENOSPC: "no space left on the device: free some space and re-run (with --resume for a run)",
    errno.EDQUOT: "disk quota exceeded: free some space and re-run (with --resume for a run)",
    errno.EFBIG: "file too large (a file-size limit, ulimit -f, or the file system's maximum): free space or raise the "
                 "limit and re-run",
    errno.EROFS: "read-only file system: choose a writable output directory",
}


def describe_os_error(e: OSError) -> str:
    """One line for an operating-system error: the path (or paths) and what to do."""
    where = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None) or "a file"
    advice = _OS_ADVICE.get(e.errno) if e.errno is not None else None
    return f"{where}: {advice or (e.strerror or str(e))}"
