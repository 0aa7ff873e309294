"""Loading finished (or diverged) runs and the per-run quantities the report and the claims use.

A run is read through :class:`ofe.run_dir.RunDir`: its config, its metrics log, optionally the
quantisation result (``ofe quantize``) and the divergence note (a sweep run stopped by a
non-finite loss).
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ofe import config as C
from ofe.errors import OfeError
from ofe.models import BLOCKS, GPTConfig
from ofe.monitor import kurtosis_change_contributions
from ofe.optim import OPTIMIZERS
from ofe.run_dir import RunDir, RunDirError, find_runs
from ofe.run_config import RESUME_MUTABLE

# Settings that never define a configuration: how a run executed (RESUME_MUTABLE), where it wrote,
# what it logged, and the seed (runs that differ only in it are one configuration).
IGNORED_KEYS = RESUME_MUTABLE | {"out_dir", "seed", "data.cache_dir", "monitor_interval", "eval_interval",
                                 "eval_batches", "ckpt_interval", "decomposition_sequences", "keep_weights"}

# Model settings a block resolves to by default (GPTConfig.resolved): comparing blocks compares these too.
BLOCK_DEFAULTS = {"model.qk_norm", "model.beta", "model.beta_trainable", "model.final_norm", "model.first_norm"}


class RunError(OfeError, ValueError):
    """A directory that is not a readable run."""


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    quant: dict[str, Any] | None = None
    diverged: str | None = None  # the reason, when training stopped on a non-finite loss
    label: str = ""  # the configuration, set by :func:`label_runs`
    run_id: str | None = None  # from the run's identity; a copied run has its original's
    corpus_description: str = ""  # what the run trained on (ofe >= 0.3 records it)
    settings: dict[str, Any] = field(default_factory=dict)  # flattened config without IGNORED_KEYS
    quant_at: dict[int, dict[str, Any]] = field(default_factory=dict)  # step -> result, for kept weights
    kept_steps: tuple[int, ...] = ()  # steps whose weights the run kept (keep_weights)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @functools.cached_property
    def monitored(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "kurtosis" in r]

    @property
    def final(self) -> dict[str, Any]:
        """The last monitored record (the end of training for a finished run)."""
        mon = self.monitored
        if not mon:
            raise RunError(f"{self.path}: no monitored step in its metrics log")
        return mon[-1]

    def kurtosis_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Monitored steps ``(S,)`` and per-layer kurtosis ``(S, L)``."""
        mon = self.monitored
        return np.array([r["step"] for r in mon]), np.array([r["kurtosis"] for r in mon], dtype=float)

    def val_loss(self) -> float:
        vals = [r["val_loss"] for r in self.records if "val_loss" in r]
        return vals[-1] if vals else float("nan")

    @property
    def steps(self) -> int:
        """Updates the run was configured for (its final weights are after this many)."""
        return int(self.config.get("steps", 0))

    def val_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Evaluation steps ``(E,)`` and validation losses ``(E,)`` (nats/token), the final one last."""
        rows = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        if not rows:
            return np.zeros(0, dtype=int), np.zeros(0)
        steps, loss = map(np.array, zip(*rows))
        return steps, loss.astype(float)

    def step_reaching(self, target: float) -> int | None:
        """The first step whose weights exist (kept, or the final ones) and whose validation loss is
        at most ``target``; None if there is none."""
        available = set(self.kept_steps) | {self.steps}
        for step, loss in zip(*self.val_curve()):
            if int(step) in available and loss <= target:
                return int(step)
        return None

    def train_loss_curve(self, window: int = 20) -> tuple[np.ndarray, np.ndarray]:
        """Steps and the training loss smoothed by a trailing mean over ``window`` steps."""
        rows = [(r["step"], r["train_loss"]) for r in self.records if "train_loss" in r]
        if not rows:
            return np.zeros(0), np.zeros(0)
        steps, loss = map(np.array, zip(*rows))
        kernel = np.ones(min(window, len(loss)))
        smooth = np.convolve(loss, kernel, "full")[: len(loss)] / np.convolve(np.ones_like(loss), kernel, "full")[: len(loss)]
        return steps, smooth

    def kurtosis_at_loss(self, target: float, window: int = 20) -> float | None:
        """Mean-over-layers kurtosis at the first monitored step whose smoothed training loss is
        at most ``target`` (None if the run never reaches it)."""
        steps, loss = self.train_loss_curve(window)
        reached = steps[loss <= target]
        if reached.size == 0:
            return None
        for r in self.monitored:
            if r["step"] >= reached[0]:
                return float(np.mean(r["kurtosis"]))
        return float(np.mean(self.final["kurtosis"]))

    def final_train_loss(self, window: int = 20) -> float:
        _, loss = self.train_loss_curve(window)
        return float(loss[-1]) if loss.size else float("nan")

    @functools.cached_property
    def decomposition(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Steps ``(S,)`` and cumulative per-term kurtosis changes ``(S, L)`` (see
        :func:`ofe.monitor.kurtosis_change_contributions`)."""
        rows = [r for r in self.records if "kurtosis_update" in r]
        if not rows:
            return np.zeros(0), {}
        parts = [kurtosis_change_contributions(r["kurtosis_update"]) for r in rows]
        cumulative = {k: np.cumsum(np.array([p[k] for p in parts], dtype=float), axis=0) for k in parts[0]}
        return np.array([r["step"] for r in rows]), cumulative

    def quant_result(self, step: int | None = None) -> dict[str, Any] | None:
        """The quantisation result of the final weights (``step`` None or the final step) or of
        those kept at ``step``; None if not measured."""
        return self.quant if step is None or step == self.steps else self.quant_at.get(step)

    def quant_increase(self, fmt: str, step: int | None = None) -> float | None:
        """Perplexity increase in percent of a quantisation format (``W8A8``, ``W8A4``...) at the end
        or at a kept step, if measured."""
        for f in (self.quant_result(step) or {}).get("formats", []):
            if f["format"] == fmt:
                return float(f["increase_pct"])
        return None


def at_block_defaults(run: Run) -> bool:
    """Whether the run uses its block's own defaults for the settings a block resolves
    (QK-norm, beta, final / first norm), as ``GPTConfig.resolved()`` would set them."""
    block, layers = run.settings.get("model.block"), run.settings.get("model.n_layer")
    if block is None or layers is None:
        return True  # not an ofe config: nothing to compare
    defaults = GPTConfig(block=block, n_layer=layers).resolved()
    for key in BLOCK_DEFAULTS:
        default = getattr(defaults, key.split(".", 1)[1])
        if run.settings.get(key, default) != default:
            return False
    return True


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = tuple(value) if isinstance(value, list) else value
    return flat


def load_run(path: str | Path) -> Run:
    """One run: its config (in today's layout), metrics, quantisation result and divergence note."""
    run = RunDir(path)
    try:
        config = C.to_dict(run.config())
        records = run.read_metrics()
        quant = run.read_quant()
        kept = tuple(run.kept_steps())
        quant_at = {step: run.read_quant(step) for step in run.quantised_steps()}
        identity = run.read_identity()
    except RunDirError as e:
        raise RunError(str(e)) from None
    diverged = run.read_diverged()
    if not diverged and not any("kurtosis" in r for r in records):
        raise RunError(f"{path}: no monitored step in its metrics log (did training start?)")
    settings = {k: v for k, v in _flatten(config).items() if k not in IGNORED_KEYS}
    return Run(Path(path), config, records, quant, diverged, settings=settings,
               run_id=identity["run_id"] if identity else None, quant_at=quant_at, kept_steps=kept,
               corpus_description=str((identity or {}).get("corpus_description", "")))


# Keys of a metrics record that only an unmonitored, unevaluated step has: the evidence keeps its
# step and training loss (the loss curves and the matched-training-loss claims read them).
_PLAIN_STEP_KEYS = frozenset({"step", "lr", "tokens", "train_loss", "tokens_per_s"})
EVIDENCE_SCHEMA = 1


def run_evidence(run: Run) -> dict[str, Any]:
    """Everything the report and the claims read from a run, as JSON: its config, the metrics records
    that carry a measurement (every step's training loss, every monitored or evaluated step in full),
    its quantisation results, kept steps and divergence note. :func:`run_from_evidence` inverts it."""
    records = [r if set(r) - _PLAIN_STEP_KEYS else {"step": r["step"], "train_loss": r["train_loss"]}
               for r in run.records if "step" in r and (set(r) - _PLAIN_STEP_KEYS or "train_loss" in r)]
    return {"path": str(run.path), "config": run.config, "records": records, "quant": run.quant,
            "quant_at": {str(step): q for step, q in sorted(run.quant_at.items())}, "kept_steps": list(run.kept_steps),
            "diverged": run.diverged, "run_id": run.run_id, "corpus_description": run.corpus_description}


def run_from_evidence(entry: dict[str, Any]) -> Run:
    """The :class:`Run` that :func:`run_evidence` saved (its directory need not exist any more)."""
    try:
        config = entry["config"]
        settings = {k: v for k, v in _flatten(config).items() if k not in IGNORED_KEYS}
        return Run(Path(entry["path"]), config, list(entry["records"]), entry["quant"], entry["diverged"],
                   settings=settings, run_id=entry["run_id"], corpus_description=str(entry["corpus_description"]),
                   quant_at={int(step): q for step, q in entry["quant_at"].items()},
                   kept_steps=tuple(int(s) for s in entry["kept_steps"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RunError(f"a run in the evidence file is malformed ({type(e).__name__}: {e})") from None


def _canonical_order(run: Run) -> tuple[int, int]:
    """Blocks in the zoo's order, then optimisers in the registry's: one order (and so one colour per
    configuration) in every report, whatever order the directories were given or listed in."""
    blocks, optimizers = list(BLOCKS), list(OPTIMIZERS)
    block, optimizer = run.settings.get("model.block"), run.settings.get("optim.name")
    return (blocks.index(block) if block in blocks else len(blocks),
            optimizers.index(optimizer) if optimizer in optimizers else len(optimizers))


def _without_copies(runs: list[Run]) -> list[Run]:
    """Each run once: a directory copied from another (same run id) is left out, with a warning."""
    seen: dict[str, Path] = {}
    kept = []
    for run in runs:
        if run.run_id is not None and run.run_id in seen:
            warnings.warn(f"{run.path} is a copy of {seen[run.run_id]} (same run id): counted once", stacklevel=3)
            continue
        if run.run_id is not None:
            seen[run.run_id] = run.path
        kept.append(run)
    return kept


def arm_name(run: Run) -> str:
    """``block + optimiser``: how labels and reports name a run's block and optimiser."""
    return f"{run.settings.get('model.block')} + {run.settings.get('optim.name')}"


def label_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Name each run's configuration and group the seeds of one configuration, in first-seen order.

    The label is ``block + optimiser`` followed by each other setting in which the run departs from
    the most common value among the runs (among runs of the same block for the settings a block
    resolves by default, and of the same block and optimiser for the lr, which each is tuned at):
    ``pre-ln + adamw lr=0.001``. Runs that differ only in their seed share a
    label; runs of different configurations never do.
    """
    keys = sorted(k for k in set().union(*(r.settings for r in runs)) if k not in ("model.block", "optim.name"))

    def peer(key: str, a: Run, b: Run) -> bool:
        if key == "optim.lr":
            return all(a.settings.get(k) == b.settings.get(k) for k in ("model.block", "optim.name"))
        return key not in BLOCK_DEFAULTS or a.settings.get("model.block") == b.settings.get("model.block")

    def common(key: str, run: Run) -> str:  # most common value among the run's peers; ties: first seen
        values = [repr(r.settings.get(key)) for r in runs if peer(key, r, run)]
        return max(dict.fromkeys(values), key=values.count)

    groups: dict[str, list[Run]] = {}
    for run in runs:
        extra = []
        for key in keys:
            if repr(run.settings.get(key)) != common(key, run):
                extra.append(f"{key.rsplit('.', 1)[-1]}={_short(run.settings.get(key))}")
        run.label = " ".join([arm_name(run), *extra])
        groups.setdefault(run.label, []).append(run)
    return groups


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(_short(v) for v in value)
    return str(value)


def order_and_label(runs: list[Run]) -> list[Run]:
    """Each run once, in the canonical order, labelled (what every report of these runs starts from)."""
    runs = sorted(_without_copies(runs), key=_canonical_order)  # stable: seeds and variants keep their order
    label_runs(runs)
    return runs


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Load every run; a directory that holds runs (e.g. a sweep) is expanded to its runs."""
    runs: list[Run] = []
    for p in paths:
        try:
            found = find_runs(p)
        except RunDirError as e:
            raise RunError(str(e)) from None
        runs += [load_run(r.path) for r in found]
    if not runs:
        raise RunError("no runs given")
    return order_and_label(runs)
