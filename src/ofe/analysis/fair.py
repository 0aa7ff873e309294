"""Fair comparisons between configurations: each at its own tuned lr, and at matched validation loss.

*Tuned lr.* Runs that differ only in ``optim.lr`` (and the seed) are one *arm* tried at several
learning rates. An arm's tuned lr is the one with the lowest mean final validation loss over the
seeds that all its lrs were run with (a diverged seed counts as an infinite loss). Comparisons of blocks and optimisers (C2, C6,
C8) use each arm's runs at its tuned lr only, so neither side is judged at an lr that suits the
other.

*Tuning margin.* How clearly the tuned lr beats the runner-up (the lr with the next-lowest mean):
the mean over the shared seeds of the per-seed difference runner-up minus tuned, and its standard
error. The choice is *clear* when the margin exceeds twice that standard error; with one seed, or a
margin inside it, the two lrs tie within seed noise and the comparison rests on a tie-break.

*Near-optimal lr band.* The lrs an arm could reasonably be run at: those whose mean final validation
loss is within ``epsilon`` of the tuned lr's. Per lr, ``gap`` is the mean over the shared seeds of the
per-seed difference (this lr minus the tuned lr) and ``epsilon`` is the larger of twice its standard
error and :data:`BAND_FLOOR`, the measured spread of one run's final loss across thread counts and
processors (a loss difference below it is not a difference). The tuned lr is always in its band; a
diverged lr never is. Comparative claims (C2, C6, C8) are judged at every pair of lrs from the two
arms' bands (``docs/claims-protocol.md``).

*Matched loss.* Two runs of one seed end at different validation losses. The *target* is the worse
run's final validation loss; the better run is taken at the first evaluation step whose weights it
kept (``keep_weights``) and whose validation loss is at most the target. Quantising those weights
compares the two at (nearly) the same quality. Without kept weights there is no matched point.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ofe.analysis.runs import Run

LR = "optim.lr"

# The smallest band epsilon (nats/token): the measured spread of one run's final validation loss across
# thread counts and processors on the main job (docs/claims-protocol.md, "The band's floor"): up to 1.2e-3
# nats (Pre-LN + AdamW seed 0, Intel Xeon with bf16 against AMD EPYC's float32 fallback), up to 7.4e-4
# between 1 and 2 threads on one machine (OP + SOAP); rounded up.
BAND_FLOOR = 2e-3


def arm_key(run: Run) -> tuple[tuple[str, Any], ...]:
    """What defines a run's arm: every setting but the lr (the seed is never a setting)."""
    return tuple(sorted((k, repr(v)) for k, v in run.settings.items() if k != LR))


def _final_val(run: Run) -> float:
    loss = run.val_loss()
    return math.inf if run.diverged or not math.isfinite(loss) else loss


def tuned_lrs(runs: Iterable[Run]) -> dict[tuple, dict[str, Any]]:
    """Per arm: ``{"lr": tuned lr, "grid": {lr: mean final val loss}, "seeds": the seeds averaged}``;
    the tuned lr has the lowest mean (ties: the smaller lr; a diverged lr, whose mean is not finite,
    is never chosen over a finite one).

    The means are over the seeds that every lr of the arm was run with, so that extra seeds at one
    lr (e.g. more seeds of the tuned lr, run after the grid) never move the choice by seed luck; an
    arm whose lrs share no seed is averaged over all its seeds (``seeds`` lists them all)."""
    by_arm: dict[tuple, dict[float, dict[int, float]]] = {}
    for run in runs:
        lr = run.settings.get(LR)
        if lr is None:
            continue
        by_arm.setdefault(arm_key(run), {}).setdefault(float(lr), {})[run.seed] = _final_val(run)
    out = {}
    for arm, grid in by_arm.items():
        common = set.intersection(*(set(by_seed) for by_seed in grid.values()))
        seeds = common or set().union(*(set(by_seed) for by_seed in grid.values()))
        means = {lr: float(np.mean([v for s, v in by_seed.items() if s in seeds])) for lr, by_seed in sorted(grid.items())}
        best = min(means, key=lambda lr: (means[lr] if np.isfinite(means[lr]) else np.inf, lr))
        out[arm] = {"lr": best, "grid": means, "seeds": sorted(seeds), **_margin(grid, means, best, seeds)}
    return out


def _margin(grid: dict[float, dict[int, float]], means: dict[float, float], best: float, seeds: set[int]) -> dict[str, Any]:
    """The tuning margin over the runner-up lr (module docs): ``runner_up``, ``margin`` (nats, mean
    of the paired per-seed differences), ``margin_se`` (its standard error; None with one seed) and
    ``clear`` (margin > 2 SE); all None when the arm has one lr, or no finite runner-up."""
    others = [lr for lr in means if lr != best and np.isfinite(means[lr])]
    if not others:
        return {"runner_up": None, "margin": None, "margin_se": None, "clear": None}
    runner = min(others, key=lambda lr: (means[lr], lr))
    diffs = np.array([grid[runner][s] - grid[best][s] for s in sorted(seeds) if s in grid[runner] and s in grid[best]])
    margin = float(diffs.mean()) if diffs.size else means[runner] - means[best]
    se = float(diffs.std(ddof=1) / np.sqrt(diffs.size)) if diffs.size >= 2 else None
    return {"runner_up": runner, "margin": margin, "margin_se": se, "clear": se is not None and margin > 2 * se}


def lr_bands(runs: Iterable[Run]) -> dict[tuple, dict[str, Any]]:
    """Per arm (:func:`arm_key`): ``{"tuned": lr, "seeds": [...], "band": [lrs in the band],
    "rows": [{"lr", "mean_val_loss", "gap", "gap_se", "epsilon", "in_band"}]}`` (module docs); the
    means and gaps are over the seeds every lr of the arm was run with, as for the tuned lr."""
    runs = list(runs)
    grids: dict[tuple, dict[float, dict[int, float]]] = {}
    for run in runs:
        if run.settings.get(LR) is not None:
            grids.setdefault(arm_key(run), {}).setdefault(float(run.settings[LR]), {})[run.seed] = _final_val(run)
    out = {}
    for arm, tuned in tuned_lrs(runs).items():
        grid, seeds, best = grids[arm], tuned["seeds"], tuned["lr"]
        rows = []
        for lr, mean in tuned["grid"].items():
            diffs = np.array([grid[lr][s] - grid[best][s] for s in seeds if s in grid[lr] and s in grid[best]])
            finite = bool(np.isfinite(mean)) and bool(np.all(np.isfinite(diffs)))
            gap = float(diffs.mean()) if diffs.size and finite else (0.0 if lr == best else math.inf)
            se = float(diffs.std(ddof=1) / np.sqrt(diffs.size)) if finite and diffs.size >= 2 else None
            epsilon = max(BAND_FLOOR, 2 * se) if se is not None else BAND_FLOOR
            rows.append({"lr": lr, "mean_val_loss": mean, "gap": gap, "gap_se": se, "epsilon": epsilon,
                         "in_band": lr == best or (finite and gap <= epsilon)})
        out[arm] = {"tuned": best, "seeds": seeds, "band": [r["lr"] for r in rows if r["in_band"]], "rows": rows}
    return out


def in_band(runs: list[Run]) -> list[Run]:
    """The runs of each arm whose lr is in the arm's near-optimal band (all runs when every arm was run
    at one lr)."""
    bands = lr_bands(runs)
    return [r for r in runs if r.settings.get(LR) is None or float(r.settings[LR]) in bands[arm_key(r)]["band"]]


def at_tuned_lr(runs: list[Run]) -> list[Run]:
    """The runs of each arm at its tuned lr (all runs when every arm was run at one lr)."""
    tuned = tuned_lrs(runs)
    return [r for r in runs if r.settings.get(LR) is None or float(r.settings[LR]) == tuned[arm_key(r)]["lr"]]


@dataclass(frozen=True)
class MatchedPoint:
    """Two runs of one seed compared at the worse one's final validation loss."""

    worse: Run
    better: Run
    target: float  # the worse run's final validation loss (nats/token)
    better_step: int | None  # the better run's first kept step at or below the target; None: none kept

    @property
    def better_loss(self) -> float | None:
        if self.better_step is None:
            return None
        steps, loss = self.better.val_curve()
        return float(loss[list(steps).index(self.better_step)])


def matched_point(a: Run, b: Run) -> MatchedPoint:
    """The matched-loss point of two runs (:mod:`module docs <ofe.analysis.fair>`)."""
    worse, better = (a, b) if _final_val(a) >= _final_val(b) else (b, a)
    target = _final_val(worse)
    return MatchedPoint(worse, better, target, better.step_reaching(target) if math.isfinite(target) else None)
