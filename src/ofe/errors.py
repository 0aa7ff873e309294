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


class OfeError(Exception):
    """A user-facing problem: the message is one line that names what is wrong."""

    exit_code = 2
