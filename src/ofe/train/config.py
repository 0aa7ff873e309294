"""``ofe train``'s config: a file and flags, or, with ``--resume``, the saved run with what was given on top.

The config type itself, its validation and the reading of a saved run live below training
(:mod:`ofe.run_config`, :meth:`ofe.run_dir.RunDir.config`); this module only decides which of the
two is the base.
"""

from __future__ import annotations

from typing import Any

from ofe import config as C
from ofe.run_config import RESUME_MUTABLE, TrainConfig, build_train_config, incompatible_keys, upgrade, upgrade_key
from ofe.run_dir import RunDir

__all__ = ["RESUME_MUTABLE", "TrainConfig", "build_train_config", "incompatible_keys", "load_train_config"]


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _resuming(data: dict[str, Any], overrides: dict[str, str]) -> RunDir | None:
    """The run to resume, when the file and flags ask for ``resume`` into a directory holding one
    (their types are checked when the config is built)."""
    given = C.apply_overrides(TrainConfig, upgrade(data), {upgrade_key(k): v for k, v in overrides.items()})
    out_dir = given.get("out_dir", TrainConfig.out_dir)
    if given.get("resume") is not True or not isinstance(out_dir, str) or not out_dir.strip():
        return None
    run = RunDir(out_dir)
    return run if run.holds_run() else None


def load_train_config(data: dict[str, Any], overrides: dict[str, str] | None = None) -> TrainConfig:
    """``ofe train``'s config: file + flags; when resuming a run, the saved run (read once, through
    :meth:`RunDir.config`) is the base and what was given goes on top, so ``--resume`` alone continues
    a run as it was."""
    overrides = overrides or {}
    run = _resuming(data, overrides)
    if run is not None:
        data = _deep_merge(C.to_dict(run.config()), upgrade(data))
    return build_train_config(data, overrides)
