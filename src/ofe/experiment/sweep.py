"""`ofe sweep SPEC`: a grid of training runs from one file, resumable, one directory per run.

A spec (TOML or JSON)::

    out_dir = "runs/blocks-x-optimisers"   # one sub-directory per run
    quantize = true                        # also write quant.json for every run
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
A finished run (``model.safetensors``, and ``quant.json`` when quantising) is skipped; an
interrupted one is resumed from its checkpoint; a directory made by a different spec is an error.
A run stopped by a non-finite loss is a result (``DIVERGED`` holds the reason), and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ofe import config as C
from ofe.config import ConfigError
from ofe.io import atomic_write
from ofe.quant import QUANT_FILE, QuantConfig, evaluate_run
from ofe.train import NonFiniteLoss, TrainConfig, build_train_config, train
from ofe.train.config import RESUME_MUTABLE
from ofe.train.loop import CONFIG_FILE

SPEC_KEYS = {"out_dir", "base", "grid", "variants", "quantize"}
RUN_SPEC_FILE = "sweep_run.json"  # the unresolved settings of a run, to recognise it on resume
FINISHED_FILE = "model.safetensors"
DIVERGED_FILE = "DIVERGED"  # written instead when training stopped on a non-finite loss


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
    return text.replace("/", "-").replace(" ", "")


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
            name = run_name(point, vname)
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
    out = Path(run.config.out_dir)
    marker = out / RUN_SPEC_FILE
    if marker.is_file():
        if _what_it_computes(json.loads(marker.read_text())) != _what_it_computes(run.settings):
            raise ConfigError(f"sweep run {run.name}: {out} was made by a different spec; remove it or change out_dir")
    elif (out / CONFIG_FILE).exists():
        raise ConfigError(f"sweep run {run.name}: {out} holds a run that no sweep made; remove it or change out_dir")
    if (out / DIVERGED_FILE).is_file():
        return "done"
    if (out / FINISHED_FILE).is_file() and (not quantize or (out / QUANT_FILE).is_file()):
        return "done"
    return "resume" if (out / "checkpoint.pt").is_file() else "new"


def sweep_states(sweep: Sweep) -> list[str]:
    """``done`` / ``resume`` / ``new`` per run, in spec order."""
    return [_state(run, sweep.quantize) for run in sweep.runs]


@contextlib.contextmanager
def _exclusive(root: Path):
    """Hold ``root/.sweep.lock`` so that two sweeps never train into the same directories."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".sweep.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another ofe sweep is running in {root}; wait for it or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_sweep(sweep: Sweep, progress: bool = True, log: Callable[[str], None] = print) -> list[Path]:
    """Train (and quantise) every run not yet finished; returns the run directories in spec order."""
    with _exclusive(sweep.out_dir):
        return _run_locked(sweep, progress, log)


def _run_locked(sweep: Sweep, progress: bool, log: Callable[[str], None]) -> list[Path]:
    states = sweep_states(sweep)  # check every directory before training anything
    todo = sum(s != "done" for s in states)
    log(f"sweep {sweep.out_dir}: {len(sweep.runs)} runs, {len(sweep.runs) - todo} already finished")
    bar = tqdm(total=len(sweep.runs), initial=len(sweep.runs) - todo, desc="sweep", unit="run",
               disable=not progress, dynamic_ncols=True)
    write = tqdm.write if progress else log
    try:
        for run, state in zip(sweep.runs, states):
            if state == "done":
                continue
            bar.set_postfix_str(run.name)
            out = Path(run.config.out_dir)
            if not (out / FINISHED_FILE).is_file():
                if state == "new":  # stopped before the first checkpoint: start over
                    for stale in (CONFIG_FILE, "metrics.jsonl", "tokenizer.json", "tb"):
                        path = out / stale
                        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
                out.mkdir(parents=True, exist_ok=True)
                atomic_write(out / RUN_SPEC_FILE, lambda p: p.write_text(json.dumps(run.settings, indent=1)))
                try:
                    train(dataclasses.replace(run.config, resume=state == "resume", progress=False), log=write)
                except NonFiniteLoss as e:  # a result, not a failure of the sweep (e.g. OP without QK-norm)
                    atomic_write(out / DIVERGED_FILE, lambda p: p.write_text(str(e) + "\n"))
                    write(f"{run.name}: diverged: {e}")
                    bar.update(1)
                    continue
            if sweep.quantize and not (out / QUANT_FILE).is_file():
                result = evaluate_run(out, QuantConfig(), 0, True, log=write)
                atomic_write(out / QUANT_FILE, lambda p: p.write_text(json.dumps(result, indent=1)))
                write(f"{run.name}: W8A8 perplexity {result['w8a8_ppl']:.4f} (float {result['fp_ppl']:.4f})")
            bar.update(1)
    finally:
        bar.close()
    return [Path(run.config.out_dir) for run in sweep.runs]
