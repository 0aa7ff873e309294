"""`ofe sweep SPEC`: a grid of training runs from one file, resumable, one directory per run.

A spec (TOML or JSON)::

    out_dir = "runs/blocks-x-optimisers"   # one sub-directory per run
    quantize = true                        # also quantise every run (ofe quantize)
    [base]                                 # any `ofe train` settings, shared by every run
    preset = "small-cpu"
    steps = 300
    [grid]                                 # dotted keys -> values; the runs are the product
    "model.block" = ["pre-ln", "op"]
    "optim.name" = ["adamw", "soap"]
    seed = [0, 1]
    [[variants]]                           # optional: named setting groups, each crossed with the grid
    name = "lr1e-2"
    "optim.lr" = 1e-2

Every run's config is built (and checked) before the first one starts, so a bad key fails at once.
A finished run (final weights written, and quantised when the spec asks) is skipped; an interrupted
one is resumed (from its checkpoint, or from step 0 if it stopped before the first); a directory made
by a different spec is an error. A run stopped by a non-finite loss is a result (training records
why in its run directory; the sweep only reads that state), and the sweep goes on. What a run directory holds is :mod:`ofe.run_dir`'s business.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ofe import config as C
from ofe.config import ConfigError
from ofe.io import LockHeld, exclusive_lock
from ofe.quant import quantize_run
from ofe.run_dir import RunDir, RunState, check_name
from ofe.run_config import RESUME_MUTABLE, TrainConfig, build_train_config
from ofe.train import NonFiniteLoss, train

SPEC_KEYS = {"out_dir", "base", "grid", "variants", "quantize"}
SWEEP_LOCK = ".sweep.lock"


@dataclass(frozen=True)
class SweepRun:
    name: str
    settings: dict[str, Any]  # base + variant + grid point, as a nested `ofe train` dict
    config: TrainConfig


@dataclass(frozen=True)
class Sweep:
    out_dir: Path
    runs: tuple[SweepRun, ...]
    quantize: bool


def _value_label(value: Any) -> str:
    text = "-".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text.replace("/", "-").replace("\\", "-").replace(" ", "")  # a path value names one directory


def run_name(point: dict[str, Any], variant: str | None) -> str:
    """Directory name of a run: the variant, then ``leafvalue`` per grid key (strings bare)."""
    parts = [variant] if variant else []
    for key, value in point.items():
        leaf = key.rsplit(".", 1)[-1]
        parts.append(_value_label(value) if isinstance(value, str) else f"{leaf}{_value_label(value)}")
    return "_".join(parts) or "run"


def parse_spec(spec: dict[str, Any], out_dir: str | None = None) -> Sweep:
    """Check a spec dict and build every run's config; :class:`ConfigError` names the bad key."""
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ConfigError(f"unknown sweep key '{unknown[0]}' (known: {', '.join(sorted(SPEC_KEYS))})")
    base, grid, variants = spec.get("base", {}), spec.get("grid", {}), spec.get("variants", [])
    if not isinstance(base, dict) or not isinstance(grid, dict):
        raise ConfigError("sweep keys 'base' and 'grid' must be tables")
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise ConfigError("sweep key 'variants' must be a list of tables")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep grid key '{key}' must be a non-empty list of values")
    root = out_dir or spec.get("out_dir")
    if not isinstance(root, str) or not root:
        raise ConfigError("sweep key 'out_dir' is missing (the directory that holds the runs)")
    quantize = spec.get("quantize", False)
    if not isinstance(quantize, bool):
        raise ConfigError(f"sweep key 'quantize' must be true or false, got {quantize!r}")
    variant_list: list[dict[str, Any]] = variants or [{}]
    runs: list[SweepRun] = []
    for variant in variant_list:
        vname = variant.get("name") if variants else None
        if variants and (not isinstance(vname, str) or not vname):
            raise ConfigError("every sweep variant needs a 'name'")
        for values in itertools.product(*grid.values()):
            point = dict(zip(grid, values))
            name = check_name(run_name(point, vname), f"sweep run name (variant {vname!r}, grid {point})")
            settings = json.loads(json.dumps(base))
            for key, value in [*((k, v) for k, v in variant.items() if k != "name"), *point.items()]:
                C.set_dotted(settings, key, value)
            if "out_dir" in settings:
                raise ConfigError("sweep: set 'out_dir' at the top level, not per run")
            settings["out_dir"] = str(Path(root) / name)
            try:
                cfg = build_train_config(settings)
            except ConfigError as e:
                raise ConfigError(f"sweep run {name}: {e}") from None
            runs.append(SweepRun(name, settings, cfg))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"sweep: two runs are both named '{dup}' (give the variants distinct names)")
    return Sweep(Path(root), tuple(runs), quantize)


def load_sweep(path: str | Path, out_dir: str | None = None) -> Sweep:
    return parse_spec(C.load_file(path), out_dir)


def _what_it_computes(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings without those that change only how a run executes (device, compile, progress)."""
    return {k: v for k, v in settings.items() if k not in RESUME_MUTABLE}


def _state(run: SweepRun, quantize: bool) -> str:
    """``done``, ``resume`` or ``new``; raises if the directory belongs to another spec."""
    out = RunDir(run.config.out_dir)
    made_by = out.read_sweep_settings()
    state = out.state()
    if made_by is not None:
        if _what_it_computes(made_by) != _what_it_computes(run.settings):
            raise ConfigError(f"sweep run {run.name}: {out} was made by a different spec; remove it or change out_dir")
    elif state is not RunState.NEW:
        raise ConfigError(f"sweep run {run.name}: {out} holds a run that no sweep made; remove it or change out_dir")
    if state is RunState.BROKEN:
        raise ConfigError(f"sweep run {run.name}: {out} holds run files without a readable config; remove it")
    if state is RunState.DIVERGED or (state is RunState.FINISHED and (not quantize or out.has_quant())):
        return "done"
    return "resume" if state is not RunState.NEW else "new"


def sweep_states(sweep: Sweep) -> list[str]:
    """``done`` / ``resume`` / ``new`` per run, in spec order."""
    return [_state(run, sweep.quantize) for run in sweep.runs]


STUDY_LOCK = ".study.lock"


@contextlib.contextmanager
def exclusive_folder(root: Path, lock: str, command: str):
    """Hold ``root``'s lock file ``lock`` for the block: a second ``ofe COMMAND`` on the same folder is
    refused at once, naming the pid that holds it."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(root / lock):
            yield
    except LockHeld as e:
        raise ConfigError(f"another ofe {command} (pid {e.pid}) is running in {root}; wait for it or stop it") from None


def _exclusive(root: Path):
    """The sweep directory's lock: two sweeps never train into the same directories."""
    return exclusive_folder(root, SWEEP_LOCK, "sweep")


def exclusive_study(root: Path, command: str):
    """The study lock of a whole ``ofe reproduce`` / ``ofe remedies`` (its sweep, the quantisation after it
    and its outputs), beside the sweep's own lock."""
    return exclusive_folder(root, STUDY_LOCK, command)


def run_sweep(sweep: Sweep, progress: bool = True, log: Callable[[str], None] = print, workers: int = 1) -> list[Path]:
    """Train (and quantise) every run not yet finished; returns the run directories in spec order.

    ``workers`` > 1 trains that many runs at a time, each in its own process on ``cpu_count // workers``
    threads (small models use two cores better as two one-thread runs than as one two-thread run)."""
    if workers < 1:
        raise ConfigError(f"config key 'workers' must be >= 1, got {workers}")
    with _exclusive(sweep.out_dir):
        return _run_locked(sweep, progress, log, workers)


def _train_and_quantise(run: SweepRun, state: str, quantize: bool, log: Callable[[str], None],
                        threads: int | None = None) -> str:
    """One run of a sweep, from wherever it stopped; returns a one-line outcome (a divergence is one)."""
    if threads:
        torch.set_num_threads(threads)
    out = RunDir(run.config.out_dir)
    if not out.is_finished():
        out.create()
        out.write_sweep_settings(run.settings)
        try:
            train(dataclasses.replace(run.config, resume=state == "resume", progress=False), log=log)
        except NonFiniteLoss as e:  # a result (training recorded it in the run), not a failure of the sweep
            return f"{run.name}: diverged: {e}"
    if quantize and not out.has_quant():
        result = quantize_run(out.path, log=log)
        return f"{run.name}: W8A8 perplexity {result['w8a8_ppl']:.4f} (float {result['fp_ppl']:.4f})"
    return f"{run.name}: trained"


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    """The log of a run in a worker process: its outcome line is reported by the parent."""


def _run_locked(sweep: Sweep, progress: bool, log: Callable[[str], None], workers: int = 1) -> list[Path]:
    states = sweep_states(sweep)  # check every directory before training anything
    todo = [(run, state) for run, state in zip(sweep.runs, states) if state != "done"]
    log(f"sweep {sweep.out_dir}: {len(sweep.runs)} runs, {len(sweep.runs) - len(todo)} already finished"
        + (f"; {workers} at a time" if workers > 1 and len(todo) > 1 else ""))
    bar = tqdm(total=len(sweep.runs), initial=len(sweep.runs) - len(todo), desc="sweep", unit="run",
               disable=not progress, dynamic_ncols=True)
    write = tqdm.write if progress else log
    try:
        if workers > 1 and len(todo) > 1:
            _run_parallel(todo, sweep.quantize, workers, bar, write)
        else:
            for run, state in todo:
                bar.set_postfix_str(run.name)
                write(_train_and_quantise(run, state, sweep.quantize, write))
                bar.update(1)
    finally:
        bar.close()
    return [Path(run.config.out_dir) for run in sweep.runs]


def _run_parallel(todo: list[tuple[SweepRun, str]], quantize: bool, workers: int, bar: tqdm,
                  write: Callable[[str], None]) -> None:
    """The runs ``todo``, ``workers`` at a time in spawned processes, in spec order as workers free up."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch threads inherited from a fork
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_die_with_parent,
                                                initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(_train_and_quantise, run, state, quantize, _quiet, threads) for run, state in todo]
        try:
            for future in concurrent.futures.as_completed(futures):
                write(future.result())
                bar.update(1)
        except BaseException:  # Ctrl-C, SIGTERM or a failed run: stop the workers now, not after their runs
            for future in futures:
                future.cancel()
            _kill_workers(pool)
            raise


def _die_with_parent(parent: int) -> None:
    """Worker initialiser: on Linux the kernel kills this worker when the sweep's process dies, however
    it dies (SIGKILL included), so that no orphan trains on holding its run's lock. Each run directory
    survives a kill at any instant; re-running the sweep resumes it."""
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _kill_workers(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """SIGKILL the pool's worker processes (``kill_workers`` where Python has it, 3.14+); a
    stopped or busy worker would otherwise keep the sweep waiting until its run ends."""
    kill = getattr(pool, "kill_workers", None)
    if callable(kill):
        kill()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(OSError, ValueError):
            process.kill()


@dataclass(frozen=True)
class SweepOptions:
    """Options of ``ofe sweep`` (the runs themselves are described by SPEC)."""

    out_dir: str = C.field("", "directory of the runs; empty: the spec's out_dir")
    progress: bool = C.field(True, "show a progress bar over the whole sweep")
    workers: int = C.field(1, "runs trained at a time, each in its own process on cpu_count / workers threads")
    dry_run: bool = C.field(False, "list the runs and their state, train nothing")


def sweep_spec_file(spec: str | Path, opts: SweepOptions = SweepOptions(), log: Callable[[str], None] = print) -> list[Path]:
    """``ofe sweep``: run the spec's sweep, or with ``dry_run`` list its runs and their state."""
    if not Path(spec).is_file():
        raise ConfigError(f"sweep spec {spec} does not exist")
    planned = load_sweep(spec, opts.out_dir or None)
    if opts.dry_run:
        for run, state in zip(planned.runs, sweep_states(planned)):
            log(f"{state:>7}  {run.config.out_dir}")
        return []
    return run_sweep(planned, progress=opts.progress, log=log, workers=opts.workers)
