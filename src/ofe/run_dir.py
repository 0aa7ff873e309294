"""The run directory: the one module that knows what a run writes and how it is read back.

A run directory (``ofe train --out_dir DIR``) holds:

============================  ====================================================================
``run.json``                  the run's identity: a random ``run_id`` (a copied run keeps it, so a report
                              counts it once) and the fingerprint of the corpus it trains on
``config.json``               the resolved :class:`~ofe.run_config.TrainConfig`; its presence makes DIR a run
``tokenizer.json``            the tokenizer the run trained with
``metrics.jsonl``             one JSON record per logged step (``docs/training.md`` lists the keys)
``tb/``                       the same scalars as TensorBoard events
``checkpoint.pt``             the resumable state (weights, optimiser, RNG, decomposition tracker)
``checkpoint.prev.pt``        the one before, until the newest one's weights have given a finite loss
``checkpoint.dcp/``           ``--parallel fsdp``: the resumable state as a sharded torch.distributed.checkpoint
                              directory (each process's shards, DCP's ``.metadata``, and ``state.pt``: step,
                              RNG, config, decomposition tracker); ``checkpoint.prev.dcp/`` the one before
``model.safetensors``         the final weights: written last, so its presence means *finished*
``quant.json``                ``ofe quantize``'s result (optional)
``weights/step_NNNNNN.st``    the weights after NNNNNN updates, kept at every evaluation step when the
                              run trains with ``keep_weights`` (safetensors; for matched-loss comparisons)
``quant.step_NNNNNN.json``    ``ofe quantize --step NNNNNN``'s result for those weights (optional)
``DIVERGED``                  why training stopped on a non-finite loss (written by training: a state)
``sweep_run.json``            the unresolved settings a sweep gave the run (sweeps only)
``.lock``                     held (``flock``) by the process that trains in DIR; holds its pid
``.ofe-run``                  written first by a new run: the directory is ofe's (its files may be replaced)
============================  ====================================================================

Every file is written atomically (:func:`ofe.io.atomic_write`), so a kill at any instant leaves
either the old file or the new one. Reading a missing or malformed file raises :class:`RunDirError`
naming it. :meth:`RunDir.state` answers whether a directory is a new, resumable, finished, diverged
or broken run.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import pickle
import shutil
import tempfile
import uuid
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from ofe.config import ConfigError, to_dict
from ofe.errors import OfeError
from ofe.io import LockHeld, atomic_write, clean_stale_temporaries, exclusive_lock, open_append, pause_point
from ofe.run_config import TrainConfig, from_saved

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"  # kept until the newest checkpoint's weights give a finite loss
SHARDED = "checkpoint.dcp"  # --parallel fsdp: a DCP directory, renamed into place whole
PREVIOUS_SHARDED = "checkpoint.prev.dcp"
SHARDED_STAGING = ".checkpoint.dcp.staging"  # where the processes write a sharded checkpoint before it is complete
SHARDED_TRASH = ".checkpoint.dcp.trash"  # an old sharded checkpoint is renamed here before it is deleted
SHARDED_STATE = "state.pt"  # in a sharded checkpoint: everything but the shards
DCP_METADATA = ".metadata"  # written by DCP last, once every shard is written
WEIGHTS = "model.safetensors"
QUANT = "quant.json"
KEPT_WEIGHTS = "weights"  # folder of step_NNNNNN.st
STEP_QUANT = "quant.step_{step:06d}.json"
DIVERGED = "DIVERGED"
SWEEP_SETTINGS = "sweep_run.json"
IDENTITY = "run.json"
LOCK = ".lock"
MARKER = ".ofe-run"
# Files a run writes: a directory holding any of them without the marker or a config is not ofe's to write into.
RUN_FILES = (CONFIG, TOKENIZER, METRICS, TENSORBOARD, CHECKPOINT, PREVIOUS_CHECKPOINT, SHARDED, PREVIOUS_SHARDED,
             WEIGHTS, QUANT, IDENTITY, DIVERGED, KEPT_WEIGHTS)

# What a checkpoint must hold to resume a run (a sharded one holds the model and optimiser as shards).
CHECKPOINT_KEYS = frozenset({"step", "model", "optimizer", "rng", "config"})
SHARDED_KEYS = CHECKPOINT_KEYS - {"model", "optimizer"}


class RunDirError(OfeError):
    """A run directory, or a file in it, that is missing, malformed or in use."""


class CheckpointError(RunDirError):
    """A checkpoint that is missing, corrupt, truncated or from another run."""


class RunState(str, enum.Enum):
    NEW = "new"  # no run yet (the directory may not exist)
    RESUMABLE = "resumable"  # a run that has not written its final weights
    FINISHED = "finished"  # the final weights exist
    DIVERGED = "diverged"  # training stopped on a non-finite loss (DIVERGED holds why)
    BROKEN = "broken"  # run files without a readable config.json (ours, damaged)
    FOREIGN = "foreign"  # files a run would write, but neither ofe's marker nor a config: not ours to replace


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise RunDirError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is not valid JSON ({e})") from None


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))


@dataclass(frozen=True)
class RunDir:
    """A run directory at ``path`` (which need not exist yet)."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    def __str__(self) -> str:
        return str(self.path)

    # ---- what is where ----------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS

    def quant_path(self, step: int | None = None) -> Path:
        """``ofe quantize``'s result: of the final weights (``step`` None) or of those kept at ``step``."""
        return self.path / (QUANT if step is None else STEP_QUANT.format(step=step))

    def kept_weights_path(self, step: int) -> Path:
        return self.path / KEPT_WEIGHTS / f"step_{step:06d}.st"

    # ---- state ------------------------------------------------------------------------------------
    def holds_run(self) -> bool:
        return self.config_path.is_file()

    def is_finished(self) -> bool:
        return self.holds_run() and self.weights_path.is_file()

    def has_quant(self, step: int | None = None) -> bool:
        return self.quant_path(step).is_file()

    def kept_steps(self) -> list[int]:
        """Steps whose weights the run kept (``keep_weights``), ascending."""
        folder = self.path / KEPT_WEIGHTS
        if not folder.is_dir():
            return []
        steps = []
        for f in folder.iterdir():
            stem = f.name.removeprefix("step_").removesuffix(".st")
            if f.name.startswith("step_") and f.suffix == ".st" and stem.isdigit():
                steps.append(int(stem))
        return sorted(steps)

    def foreign_files(self) -> list[str]:
        """Names a run would write that are present although the directory has neither ofe's marker nor
        a config: someone else's files, which ofe must not replace."""
        if self.holds_run() or (self.path / MARKER).is_file():
            return []
        return [name for name in RUN_FILES if (self.path / name).exists() or (self.path / name).is_symlink()]

    def state(self) -> RunState:
        """What the directory holds; reads only ``config.json`` (to tell a broken run)."""
        if not self.holds_run():
            if self.foreign_files():
                return RunState.FOREIGN
            leftovers = [p.name for p in (self.checkpoint_path, self.path / SHARDED, self.weights_path) if p.exists()]
            return RunState.BROKEN if leftovers else RunState.NEW
        try:
            config = _read_json(self.config_path)
        except RunDirError:
            return RunState.BROKEN
        if not isinstance(config, dict):
            return RunState.BROKEN
        if (self.path / DIVERGED).is_file():
            return RunState.DIVERGED
        return RunState.FINISHED if self.weights_path.is_file() else RunState.RESUMABLE

    # ---- creating a run ------------------------------------------------------------------------
    def create(self) -> None:
        """Make the directory and check that it is writable (before anything is trained)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.path, prefix=".write-test.")  # O_EXCL | O_NOFOLLOW
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise RunDirError(f"output directory {self.path} is not writable: {e.strerror or e}") from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run's lock for the duration; a second holder gets :class:`RunDirError` naming our pid."""
        self.create()
        try:
            with exclusive_lock(self.path / LOCK):
                clean_stale_temporaries(self.path)  # of a writer killed mid-write: nobody else writes here now
                for name in (SHARDED_STAGING, SHARDED_TRASH):  # a sharded checkpoint half written or half deleted
                    self._remove_own_dir(self.path / name)
                yield
        except LockHeld as e:
            raise RunDirError(f"run {self.path} is in use by pid {e.pid}") from None

    # ---- config and tokenizer -------------------------------------------------------------------
    def config(self) -> TrainConfig:
        """The run's saved config, typed: read, migrated from older ofe versions and validated
        (:func:`ofe.run_config.from_saved`). The one reader of a saved config; a missing, malformed
        or invalid file is a :class:`RunDirError` naming it."""
        return self._typed(self._saved_settings(), self.config_path)

    def checkpoint_config(self, state: dict[str, Any]) -> TrainConfig:
        """The config a loaded checkpoint was written with, read as :meth:`config` reads the file."""
        try:
            saved = json.loads(state["config"])
        except (KeyError, TypeError, ValueError):
            saved = None
        if not isinstance(saved, dict):
            raise CheckpointError(f"checkpoint in {self.path} holds no readable config")
        return self._typed(saved, self.checkpoint_path)

    def _saved_settings(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise RunDirError(f"{self.path} is not an ofe run directory ({CONFIG} missing)")
        config = _read_json(self.config_path)
        if not isinstance(config, dict):
            raise RunDirError(f"{self.config_path} does not hold a table of settings")
        return config

    @staticmethod
    def _typed(saved: dict[str, Any], where: Path) -> TrainConfig:
        try:
            return from_saved(saved)
        except ConfigError as e:
            raise RunDirError(f"{where} is not a valid run config: {e}") from None

    def mark(self) -> None:
        """Claim the directory for a new run (before any other file): its files are ofe's from now on."""
        _write_json(self.path / MARKER, {"ofe": "run directory"})

    def write_config(self, config: TrainConfig) -> None:
        _write_json(self.config_path, to_dict(config))

    def read_identity(self) -> dict[str, Any] | None:
        """``{"run_id", "corpus"}``, or None for a run made before ofe wrote it."""
        path = self.path / IDENTITY
        if not path.is_file():
            return None
        identity = _read_json(path)
        if not isinstance(identity, dict) or not isinstance(identity.get("run_id"), str):
            raise RunDirError(f"{path} does not hold a run identity")
        return identity

    def write_identity(self, corpus: str, run_id: str | None = None, description: str = "") -> dict[str, Any]:
        """Record a (new, unless given) run id, the corpus fingerprint and its description."""
        identity = {"run_id": run_id or uuid.uuid4().hex, "corpus": corpus}
        if description:
            identity["corpus_description"] = description
        _write_json(self.path / IDENTITY, identity)
        return identity

    def write_tokenizer(self, source: Path) -> None:
        atomic_write(self.tokenizer_path, lambda tmp: shutil.copyfile(source, tmp))

    # ---- metrics ------------------------------------------------------------------------------------
    def read_metrics(self) -> list[dict[str, Any]]:
        """Every record of ``metrics.jsonl`` (none if it does not exist yet).

        A torn last line (the process was killed mid-write) is dropped with a warning: the step it
        described is logged again when the run resumes. A malformed line elsewhere is an error.
        """
        if not self.metrics_path.is_file():
            return []
        lines = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "step" not in record:
                    raise ValueError("not a record with a step")
                _check_record(record)
            except ValueError as e:
                if number == len(lines):
                    warnings.warn(f"{self.metrics_path}: dropped a torn last line (the run was interrupted mid-write)",
                                  stacklevel=2)
                    break
                raise RunDirError(f"{self.metrics_path} line {number} is malformed ({e})") from None
            records.append(record)
        return records

    def truncate_metrics(self, before_step: int) -> None:
        """Keep only the records with ``step < before_step`` (those before the checkpoint resumed from)."""
        if self.metrics_path.is_file():
            keep = [r for r in self.read_metrics() if r["step"] < before_step]
            atomic_write(self.metrics_path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in keep)))

    def open_metrics(self) -> TextIO:
        """``metrics.jsonl`` opened for appending one record per line."""
        return open_append(self.metrics_path)

    # ---- checkpoint and weights ---------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write the checkpoint; the one it replaces is kept as the previous checkpoint until
        :meth:`confirm_checkpoint` (a crash at any instant leaves one of the two loadable)."""
        missing = CHECKPOINT_KEYS - set(state)
        if missing:
            raise ValueError(f"checkpoint state lacks {sorted(missing)}")
        previous = self.path / PREVIOUS_CHECKPOINT

        def write(tmp: Path) -> None:
            torch.save(state, tmp)
            if self.checkpoint_path.exists():
                os.replace(self.checkpoint_path, previous)
                pause_point("checkpoint-set-aside")

        atomic_write(self.checkpoint_path, write)

    # ---- sharded checkpoints (--parallel fsdp) ---------------------------------------------------
    @staticmethod
    def _remove_own_dir(path: Path) -> None:
        """Delete a directory of ofe's own naming: first renamed aside, so a kill midway never leaves a
        half-deleted checkpoint under a name that is loaded; a link there is removed, never followed."""
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            if path.name != SHARDED_TRASH:
                trash = path.parent / SHARDED_TRASH
                RunDir._remove_own_dir(trash)
                os.replace(path, trash)
                path = trash
            shutil.rmtree(path)

    @property
    def sharded_staging_path(self) -> Path:
        """Where every process writes its shards of the checkpoint being saved."""
        return self.path / SHARDED_STAGING

    def begin_sharded_checkpoint(self) -> Path:
        """Main process, before the shards are written: an empty staging directory for them."""
        staging = self.path / SHARDED_STAGING
        self._remove_own_dir(staging)
        staging.mkdir()
        return staging

    def finish_sharded_checkpoint(self, state: dict[str, Any]) -> None:
        """Main process, once every process has written its shards into the staging directory: add
        ``state`` (step, RNG, config, ...) and rename the directory into place; the checkpoint it
        replaces is kept as the previous one until :meth:`confirm_checkpoint`. Renames are atomic, so
        a kill at any instant leaves a complete checkpoint under the loaded names, or none."""
        missing = SHARDED_KEYS - set(state)
        if missing:
            raise ValueError(f"checkpoint state lacks {sorted(missing)}")
        staging = self.path / SHARDED_STAGING
        if not (staging / DCP_METADATA).is_file():
            raise CheckpointError(f"sharded checkpoint in {staging} is incomplete (no {DCP_METADATA})")
        atomic_write(staging / SHARDED_STATE, lambda tmp: torch.save(state, tmp))
        current, previous = self.path / SHARDED, self.path / PREVIOUS_SHARDED
        if current.is_dir():
            self._remove_own_dir(previous)
            os.replace(current, previous)
            pause_point("checkpoint-set-aside")
        os.replace(staging, current)
        _fsync_dir(self.path)

    @staticmethod
    def _complete(directory: Path) -> bool:
        return (not directory.is_symlink() and (directory / DCP_METADATA).is_file()
                and (directory / SHARDED_STATE).is_file())

    def _sharded(self) -> Path | None:
        """The sharded checkpoint to resume from: the newest, or the previous one if a kill fell
        between setting it aside and renaming the new one into place."""
        return next((d for d in (self.path / SHARDED, self.path / PREVIOUS_SHARDED) if self._complete(d)), None)

    def _load_sharded(self, directory: Path) -> dict[str, Any]:
        """A sharded checkpoint's state, with ``"shards"``: the directory DCP loads the shards from."""
        return {**_load_state(directory / SHARDED_STATE, SHARDED_KEYS), "shards": str(directory)}

    # ---- either kind -----------------------------------------------------------------------------
    def confirm_checkpoint(self) -> None:
        """The newest checkpoint's weights gave a finite loss: the previous one is no longer needed."""
        (self.path / PREVIOUS_CHECKPOINT).unlink(missing_ok=True)
        self._remove_own_dir(self.path / PREVIOUS_SHARDED)

    def revert_checkpoint(self) -> bool:
        """The newest checkpoint's weights gave a non-finite loss: put the previous one back (True),
        or remove the newest if there is none before it (False)."""
        if (self.path / SHARDED).is_dir() or (self.path / PREVIOUS_SHARDED).is_dir():
            previous = self.path / PREVIOUS_SHARDED
            if previous.is_dir():
                self._remove_own_dir(self.path / SHARDED)
                os.replace(previous, self.path / SHARDED)
                return True
            self._remove_own_dir(self.path / SHARDED)
            return False
        previous = self.path / PREVIOUS_CHECKPOINT
        if previous.exists():
            os.replace(previous, self.checkpoint_path)
            return True
        self.checkpoint_path.unlink(missing_ok=True)
        return False

    def has_checkpoint(self) -> bool:
        return (self.checkpoint_path.is_file() or (self.path / PREVIOUS_CHECKPOINT).is_file()
                or self._sharded() is not None)

    def load_checkpoint(self) -> dict[str, Any]:
        """Load with ``weights_only=True`` (no code runs); any damage becomes a one-line :class:`CheckpointError`.
        If a kill fell between setting the old checkpoint aside and renaming the new one into place,
        the old one is loaded. A sharded checkpoint's state has ``"shards"`` (its directory) in place
        of ``"model"`` and ``"optimizer"``."""
        sharded = self._sharded()
        if sharded is not None:
            return self._load_sharded(sharded)
        path = self.checkpoint_path
        if not path.is_file() and (self.path / PREVIOUS_CHECKPOINT).is_file():
            path = self.path / PREVIOUS_CHECKPOINT
        if not path.is_file():
            raise CheckpointError(f"no checkpoint at {path}")
        return _load_state(path, CHECKPOINT_KEYS)

    def save_weights(self, model: nn.Module) -> None:
        from safetensors.torch import save_model

        atomic_write(self.weights_path, lambda tmp: save_model(model, str(tmp)))

    def keep_weights(self, step: int, model: nn.Module) -> None:
        """Keep the weights after ``step`` updates (``keep_weights`` runs, at every evaluation)."""
        from safetensors.torch import save_model

        path = self.kept_weights_path(step)
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, lambda tmp: save_model(model, str(tmp)))

    def load_weights(self, model: nn.Module, step: int | None = None) -> nn.Module:
        """Load the final weights (``step`` None) or those kept at ``step`` into ``model`` (built
        from the run's config)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        path = self.weights_path if step is None else self.kept_weights_path(step)
        if not path.is_file():
            if step is None:
                raise RunDirError(f"{self.path} has no {WEIGHTS}: the run has not finished")
            kept = self.kept_steps()
            raise RunDirError(f"{self.path} kept no weights at step {step} (kept: "
                              f"{', '.join(map(str, kept)) if kept else 'none; train with --keep_weights true'})")
        try:
            load_model(model, str(path))
        except (SafetensorError, RuntimeError, OSError) as e:
            raise RunDirError(f"{path} does not load into the run's model: {_first_problem(e)}") from None
        damaged = next((name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()), None)
        if damaged is not None:  # training never saves such weights (it stops before a non-finite update)
            raise RunDirError(f"{path} holds non-finite values in {damaged}: the file is damaged or not this run's")
        return model

    # ---- results beside the run -----------------------------------------------------------------
    def read_quant(self, step: int | None = None) -> dict[str, Any] | None:
        """``ofe quantize``'s result for the final weights (``step`` None) or those kept at
        ``step``; None if they were not quantised."""
        path = self.quant_path(step)
        if not path.is_file():
            return None
        quant = _read_json(path)
        problem = _quant_problem(quant, final=step is None)
        if problem:
            raise RunDirError(f"{path} does not hold a quantisation result ({problem}); re-run ofe quantize")
        return quant

    def write_quant(self, result: dict[str, Any], step: int | None = None) -> None:
        _write_json(self.quant_path(step), result)

    def quantised_steps(self) -> list[int]:
        """Kept-weight steps that ``ofe quantize --step`` has evaluated, ascending."""
        return [s for s in self.kept_steps() if self.quant_path(s).is_file()]

    def read_diverged(self) -> str | None:
        """Why training stopped on a non-finite loss; None for a run that did not diverge."""
        path = self.path / DIVERGED
        return path.read_bytes().decode("utf-8", errors="replace").strip() if path.is_file() else None

    def write_diverged(self, reason: str) -> None:
        atomic_write(self.path / DIVERGED, lambda tmp: tmp.write_text(reason.strip() + "\n"))

    def read_sweep_settings(self) -> dict[str, Any] | None:
        """The settings a sweep gave this run (None outside a sweep); a file that is not a table is an error."""
        path = self.path / SWEEP_SETTINGS
        if not path.is_file():
            return None
        settings = _read_json(path)
        if not isinstance(settings, dict):
            raise RunDirError(f"{path} holds a {type(settings).__name__}, not the table of a sweep's settings; "
                              "remove the run's folder to train it again")
        return settings

    def write_sweep_settings(self, settings: dict[str, Any]) -> None:
        _write_json(self.path / SWEEP_SETTINGS, settings)


def check_name(name: str, what: str) -> str:
    """``name`` if it is safe as one directory name below a folder of runs: not empty, no path
    separator, not ``.``/``..``, no leading dot (hidden), no control characters."""
    bad = (not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name
           or any(ord(c) < 32 for c in name))
    if bad:
        raise RunDirError(f"{what} {name!r} cannot name a run directory (one path component: no '/', no '..', "
                          "no leading '.')")
    return name


def find_runs(folder: str | Path) -> list[RunDir]:
    """``folder`` itself if it holds a run, else the runs directly below it, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunDirError(f"{folder} does not exist or is not a directory")
    if RunDir(folder).holds_run():
        return [RunDir(folder)]
    runs = [RunDir(d) for d in sorted(folder.iterdir()) if d.is_dir() and RunDir(d).holds_run()]
    if not runs:
        raise RunDirError(f"{folder} holds no run (no {CONFIG} in it or its sub-directories)")
    return runs


# What a metrics record may hold: these scalars, the decomposition's table of per-layer lists, the
# per-layer kurtosis, and otherwise a number or per-layer numbers. NaN is a number (a diverged value).
_RECORD_SCALARS = frozenset({"lr", "tokens", "train_loss", "val_loss", "tokens_per_s", "threads"})


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(v: Any) -> bool:
    return isinstance(v, list) and all(x is None or _is_number(x) for x in v)


def _check_record(record: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first field of a metrics record with the wrong type."""
    if not isinstance(record["step"], int) or isinstance(record["step"], bool) or record["step"] < 0:
        raise ValueError(f"'step' is {record['step']!r}, not a step number")
    for key, value in record.items():
        if key == "step":
            continue
        if key in _RECORD_SCALARS:
            ok = value is None or _is_number(value)
        elif key == "kurtosis_update":
            ok = isinstance(value, dict) and all(_numbers(v) for v in value.values())
        elif key == "kurtosis":  # per layer: what every claim reads
            ok = _numbers(value)
        else:  # another metric: per layer, or one number
            ok = value is None or _is_number(value) or _numbers(value)
        if not ok:
            raise ValueError(f"field {key!r} has the wrong type ({type(value).__name__})")


def _quant_problem(quant: Any, final: bool) -> str | None:
    """What is wrong with a quantisation result read from disk, or None. ``final``: the result of the
    final weights, whose float perplexity the report reads (a kept step's needs only its formats)."""
    if not isinstance(quant, dict):
        return f"a {type(quant).__name__}, not a table"
    for key in ("fp_ppl", "w8a8_ppl"):
        if (key in quant or (key == "fp_ppl" and final)) and not _is_number(quant.get(key)):
            return f"'{key}' is missing or not a number"
    formats = quant.get("formats", [])
    if not isinstance(formats, list):
        return "'formats' is not a list"
    for f in formats:
        if not isinstance(f, dict) or not isinstance(f.get("format"), str) or not _is_number(f.get("increase_pct")):
            return "a format entry without a name and an increase_pct"
    draws = quant.get("calibration_draws", [])
    if not isinstance(draws, list) or not all(isinstance(d, dict) and _is_number(d.get("increase_pct")) for d in draws):
        return "'calibration_draws' is not a list of results"
    return None


def _load_state(path: Path, keys: frozenset[str]) -> dict[str, Any]:
    """A checkpoint state dict holding ``keys``, loaded with ``weights_only=True`` (no code runs); any
    damage becomes a one-line :class:`CheckpointError`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated "
                              f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})") from None
    if not isinstance(state, dict) or not keys <= set(state):
        have = set(state) if isinstance(state, dict) else set()
        raise CheckpointError(f"checkpoint {path} lacks {sorted(keys - have)}: not an ofe checkpoint")
    return state


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_problem(error: Exception, limit: int = 300) -> str:
    """One line for an error whose message may span several: torch's ``load_state_dict`` says
    "Error(s) in loading state_dict for GPT:" and lists the problems below; keep the heading and the
    first problem, shortened to ``limit`` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."
