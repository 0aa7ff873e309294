"""`TrainConfig`: everything a run needs, typed; built from a file and flags, or read back from a saved run.

This module sits below both the run directory (:meth:`ofe.run_dir.RunDir.config` returns a
:class:`TrainConfig`) and training (:mod:`ofe.train`), so that reading a run back (``ofe quantize``,
``ofe report``) never imports the trainer. It knows settings only: no files, no models.

Two ways in:

* :func:`build_train_config`: a file's dict plus ``--key value`` overrides (a new run, a sweep run);
* :func:`from_saved`: a config a run saved (any ofe version: :func:`migrate` moves ofe 0.1's keys),
  with the block's defaults resolved. :meth:`RunDir.config` is the one caller that reads the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from ofe import config as C
from ofe.config import ConfigError, field
from ofe.data import DataConfig
from ofe.models import PRESETS, GPTConfig, preset_fields
from ofe.optim import OPTIMIZERS, OptimConfig
from ofe.optim.config import MOVED, drop_unread, upgrade_optim

# Keys that may differ when resuming: they change how or where a run executes, not what it computes.
RESUME_MUTABLE = frozenset({"resume", "progress", "compile", "device", "out_dir", "quant_probe"})


MAX_COUNT = 10**9  # steps, intervals and batch sizes above this are typing mistakes, not runs


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = field("runs/default", "output directory of the run")
    preset: str = field("small-cpu", f"model preset ({', '.join(PRESETS)}) the model.* settings start from; "
                                      "a saved config keeps it as provenance, its model.* fields are the model")
    model: GPTConfig = GPTConfig()  # the small-cpu preset; model.vocab_size is set from the tokenizer
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    steps: int = field(600, "optimizer updates")
    batch_size: int = field(32, "sequences per update, over all processes and micro-batches")
    grad_accum: int = field(1, "micro-batches per update")
    eval_interval: int = field(100, "evaluate validation loss every this many updates (and at the end)")
    eval_batches: int = field(4, "validation batches of batch_size sequences")
    monitor_interval: int = field(10, "log outlier metrics every this many updates")
    quant_probe: int = field(0, "every this many updates, log the W8A8 and W4A4 perplexity cost of the simulated "
                                "quantised model on a fixed held-out batch (ofe.quant.probe; 0: off)")
    decomposition_sequences: int = field(8, "validation sequences on which the kurtosis-update terms are "
                                            "computed at monitor steps (fixed inputs); 0 disables")
    ckpt_interval: int = field(100, "write the resumable checkpoint every this many updates (and at the end)")
    keep_weights: bool = field(False, "also keep the weights at every evaluation step (weights/step_NNNNNN.st), "
                                      "so that ofe quantize --step can compare runs at matched loss")
    seed: int = field(0, "seed for initialisation and data order")
    device: str = field("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    dtype: Literal["float32", "bfloat16"] = field("float32", "compute dtype (bfloat16: autocast on GPU)")
    compile: bool = field(False, "torch.compile the model (the monitor keeps working)")
    parallel: Literal["ddp", "fsdp"] = field(
        "ddp", "how several processes (torchrun) share the work: ddp (a full replica per process, one checkpoint "
               "file) or fsdp (FSDP2: parameters, gradients and optimiser state sharded per block; a sharded "
               "torch.distributed.checkpoint directory that resumes at any world size; AdamW only)")
    resume: bool = field(False, "continue the run in out_dir from its checkpoint")
    progress: bool = field(True, "show a progress bar")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_interval", "eval_batches", "monitor_interval", "ckpt_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config key '{name}' must be positive, got {getattr(self, name)}")
            if getattr(self, name) > MAX_COUNT:  # beyond a lifetime of steps; and int64 counters overflow
                raise ConfigError(f"config key '{name}' must be at most {MAX_COUNT:.0e}, got {getattr(self, name)}")
        if self.quant_probe < 0:
            raise ConfigError(f"config key 'quant_probe' must be >= 0 (0: off), got {self.quant_probe}")
        if self.decomposition_sequences < 0:
            raise ConfigError(f"config key 'decomposition_sequences' must be >= 0, got {self.decomposition_sequences}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        preset_model = preset_fields(self.preset)
        if self.model == GPTConfig():  # left at its default: the preset's model, so the two agree
            object.__setattr__(self, "model", GPTConfig(**preset_model))
        if self.parallel == "fsdp" and not OPTIMIZERS[self.optim.name].shards:
            sharding = ", ".join(n for n, e in OPTIMIZERS.items() if e.shards)
            raise ConfigError(f"config key 'parallel': fsdp steps on sharded parameters, which optim.name "
                              f"{self.optim.name} cannot (it needs whole matrices); with fsdp use optim.name "
                              f"{sharding}, or parallel ddp")
        if not self.out_dir.strip():
            raise ConfigError("config key 'out_dir' is empty; name the run's directory")


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict in today's layout: ofe 0.1's flat ``optim`` options move into their groups."""
    optim = data.get("optim")
    return {**data, "optim": upgrade_optim(optim)} if isinstance(optim, dict) else data


def upgrade_key(key: str) -> str:
    """A dotted ``--key`` in today's layout (``optim.shampoo_beta`` -> ``optim.rotation.shampoo_beta``)."""
    head, _, leaf = key.partition(".")
    return f"optim.{MOVED[leaf]}" if head == "optim" and leaf in MOVED else key


def build_train_config(data: dict[str, Any], overrides: dict[str, str] | None = None) -> TrainConfig:
    """File dict + ``--key value`` overrides -> config; the model is the preset's with ``model.*`` on
    top, so a saved config (whose model table is complete) loads back unchanged."""
    overrides = {upgrade_key(k): v for k, v in (overrides or {}).items()}
    data = C.apply_overrides(TrainConfig, upgrade(data), overrides)
    model = data.get("model", {})
    if not isinstance(model, dict):
        raise ConfigError("config key 'model' must be a table of model settings")
    data["model"] = {**preset_fields(data.get("preset", TrainConfig.preset)), **model}
    return C.from_dict(TrainConfig, data)


def migrate(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict (any ofe version) in today's layout: ofe 0.1's flat optimiser options move
    into their groups, and options the run's optimiser never read are dropped (ofe 0.1 did not
    refuse them, so they never acted on the run; they load as defaults)."""
    saved = upgrade(saved)
    if isinstance(saved.get("optim"), dict):
        saved = {**saved, "optim": drop_unread(saved["optim"])}
    return saved


def from_saved(saved: dict[str, Any]) -> TrainConfig:
    """A config a run saved, migrated (:func:`migrate`), validated, with the block's defaults resolved
    (``ofe train`` saves them resolved, so a new run's saved config comes back equal).
    :class:`ConfigError` names a bad key."""
    cfg = build_train_config(migrate(saved))
    return dataclasses.replace(cfg, model=cfg.model.resolved())


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
