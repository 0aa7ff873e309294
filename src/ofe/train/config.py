"""`TrainConfig`: everything a run needs, typed; loading with presets, files and overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from ofe import config as C
from ofe.config import ConfigError, field
from ofe.data import DataConfig
from ofe.models import PRESETS, GPTConfig
from ofe.optim import OptimConfig

# Keys that may differ when resuming: they change how a run is executed, not what it computes.
RESUME_MUTABLE = frozenset({"resume", "progress", "compile", "device"})


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = field("runs/default", "output directory of the run")
    preset: str = field("small-cpu", f"model preset ({', '.join(PRESETS)}); model.* settings override it")
    model: GPTConfig = GPTConfig()  # the small-cpu preset; model.vocab_size is set from the tokenizer
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    steps: int = field(600, "optimizer updates")
    batch_size: int = field(32, "sequences per update, over all processes and micro-batches")
    grad_accum: int = field(1, "micro-batches per update")
    eval_interval: int = field(100, "evaluate validation loss every this many updates (and at the end)")
    eval_batches: int = field(4, "validation batches of batch_size sequences")
    monitor_interval: int = field(10, "log outlier metrics every this many updates")
    decomposition_sequences: int = field(8, "validation sequences on which the kurtosis-update terms are "
                                            "computed at monitor steps (fixed inputs); 0 disables")
    ckpt_interval: int = field(100, "write the resumable checkpoint every this many updates (and at the end)")
    seed: int = field(0, "seed for initialisation and data order")
    device: str = field("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    dtype: Literal["float32", "bfloat16"] = field("float32", "compute dtype (bfloat16: autocast on GPU)")
    compile: bool = field(False, "torch.compile the model (the monitor keeps working)")
    resume: bool = field(False, "continue the run in out_dir from its checkpoint")
    progress: bool = field(True, "show a progress bar")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_interval", "eval_batches", "monitor_interval", "ckpt_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config key '{name}' must be positive, got {getattr(self, name)}")
        if self.decomposition_sequences < 0:
            raise ConfigError(f"config key 'decomposition_sequences' must be >= 0, got {self.decomposition_sequences}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown model preset '{self.preset}' (known: {', '.join(PRESETS)})")


def build_train_config(data: dict[str, Any], overrides: dict[str, str] | None = None) -> TrainConfig:
    """File dict + ``--key value`` overrides -> config, with the preset under the ``model`` table."""
    data = C.apply_overrides(TrainConfig, data, overrides or {})
    preset = data.get("preset", TrainConfig.preset)
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError(f"unknown model preset '{preset}' (known: {', '.join(PRESETS)})")
    model = data.get("model", {})
    if not isinstance(model, dict):
        raise ConfigError("config key 'model' must be a table of model settings")
    data["model"] = {**PRESETS[preset], **model}
    return C.from_dict(TrainConfig, data)


def incompatible_keys(saved: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts, ignoring :data:`RESUME_MUTABLE`."""
    keys = []
    for key in sorted(set(saved) | set(new)):
        if not prefix and key in RESUME_MUTABLE:
            continue
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += incompatible_keys(a, b, prefix + key + ".")
        elif a != b:
            keys.append(prefix + key)
    return keys


def with_model(cfg: TrainConfig, model: GPTConfig) -> TrainConfig:
    return dataclasses.replace(cfg, model=model)
