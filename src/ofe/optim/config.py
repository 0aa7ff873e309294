"""`OptimConfig`: the optimiser, its schedule, and the options of each optimiser family, grouped."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from ofe.config import ConfigError, field
from ofe.optim.registry import COMMON, OPTIMIZERS

OptimizerName = Literal[tuple(OPTIMIZERS)]  # type: ignore[valid-type]

# Where options of ofe 0.1 (one flat table) live now: old run directories and specs still load.
MOVED = {**{k: f"adafactor.{k}" for k in ("beta2_decay", "momentum", "clip_threshold", "relative_step",
                                           "scale_parameter", "eps1", "eps2")},
         **{k: f"rotation.{k}" for k in ("shampoo_beta", "precondition_frequency", "max_precond_dim",
                                          "embedding_max_precond_dim")}}


@dataclass(frozen=True)
class AdafactorOptions:
    """Read by ``adafactor``; ``beta2_decay``, ``eps1`` and ``clip_threshold`` also by ``rotated-adafactor``."""

    beta2_decay: float | None = field(-0.8, "beta2_t = 1 - t**beta2_decay; none: constant betas[1] with bias correction")
    momentum: bool = field(True, "adafactor: keep a first moment with betas[0]")
    clip_threshold: float = field(1.0, "update clipping threshold d (RMS); 0 disables")
    relative_step: bool = field(False, "adafactor: step min(lr, 1/sqrt(t)) instead of the scheduled lr")
    scale_parameter: bool = field(False, "adafactor: scale the step by max(eps2, RMS(parameter))")
    eps1: float = field(1e-30, "added to squared gradients")
    eps2: float = field(1e-3, "adafactor: floor of the parameter scale")

    def __post_init__(self) -> None:
        if self.eps1 < 0 or self.eps2 < 0 or self.clip_threshold < 0:
            raise ConfigError("optim.adafactor.eps1, eps2 and clip_threshold must be >= 0")
        if self.beta2_decay is not None and self.beta2_decay >= 0:
            raise ConfigError(f"optim.adafactor.beta2_decay must be negative (or none), got {self.beta2_decay}")


@dataclass(frozen=True)
class RotationOptions:
    """Shampoo's eigenbasis, read by ``soap`` and ``rotated-adafactor``."""

    shampoo_beta: float | None = field(None, "EMA decay of the Kronecker factors; none: betas[1]")
    precondition_frequency: int = field(10, "refresh the eigenbases every this many steps")
    max_precond_dim: int = field(10000, "sides longer than this are not rotated")
    embedding_max_precond_dim: int | None = field(None, "the same for embeddings (e.g. the model width, to rotate "
                                                        "only that side); none: max_precond_dim")
    matmul_dtype: Literal["float32", "bfloat16"] = field(
        "float32", "dtype of the rotations' and Kronecker factors' matrix products (the state stays float32): "
                   "bfloat16 is several times faster on CPUs with bf16 matrix units (AMX) and on GPUs, and rounds "
                   "the rotated gradient and the factors' increments to bf16")
    fused: bool = field(False, "run the element-wise work (moments, update, factor EMAs) as one-pass kernels compiled "
                               "with torch.compile (needs a C++ compiler on CPU; a few seconds' compile once per "
                               "process; same results up to rounding; falls back to eager with a warning)")

    def __post_init__(self) -> None:
        if self.shampoo_beta is not None and not 0.0 <= self.shampoo_beta < 1.0:
            raise ConfigError(f"optim.rotation.shampoo_beta must be in [0, 1), got {self.shampoo_beta}")
        if self.precondition_frequency < 1 or self.max_precond_dim < 0:
            raise ConfigError("optim.rotation.precondition_frequency must be >= 1 and max_precond_dim >= 0")


@dataclass(frozen=True)
class MuonOptions:
    """Read by ``muon`` (the hidden matrices; the rest trains with AdamW and ``betas``/``eps``)."""

    momentum: float = field(0.95, "momentum of Muon's update buffer")
    nesterov: bool = field(True, "Nesterov momentum")
    ns_steps: int = field(5, "Newton-Schulz iterations")
    adjust_lr: Literal["match_rms_adamw", "original"] = field(
        "match_rms_adamw", "Muon's per-matrix lr scale: match_rms_adamw (0.2 sqrt(max(A, B)): AdamW's lr fits) or "
                           "original (sqrt(max(1, A/B)))")

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"optim.muon.momentum must be in [0, 1), got {self.momentum}")
        if not 1 <= self.ns_steps < 100:
            raise ConfigError(f"optim.muon.ns_steps must be in 1..99, got {self.ns_steps}")


@dataclass(frozen=True)
class OptimConfig:
    name: OptimizerName = field("adamw", "optimiser: " + "; ".join(f"{k}: {v.help}" for k, v in OPTIMIZERS.items()))
    lr: float = field(1e-3, "peak learning rate (adafactor with relative_step: its cap)")
    betas: tuple[float, ...] = field((0.9, 0.999), "(beta1, beta2); beta2 is adafactor's only when beta2_decay is none")
    eps: float = field(1e-8, "epsilon of Adam's denominator (adamw, soap, rotated-adafactor; muon's AdamW part)")
    weight_decay: float = field(0.1, "decoupled weight decay, applied to matrices and embeddings only")
    grad_clip: float = field(1.0, "clip the global gradient norm to this value; 0 disables")
    warmup_frac: float = field(0.05, "fraction of the steps spent in linear warmup")
    decay: Literal["linear", "cosine", "constant"] = field("linear", "decay after warmup")
    min_lr_frac: float = field(0.0, "final learning rate as a fraction of the peak")
    bias_correction: bool = field(True, "Adam-style bias correction of the moments (adafactor, soap, rotated-adafactor)")
    adafactor: AdafactorOptions = AdafactorOptions()
    rotation: RotationOptions = RotationOptions()
    muon: MuonOptions = MuonOptions()

    def __post_init__(self) -> None:
        for name in ("lr", "eps", "weight_decay", "grad_clip", "warmup_frac", "min_lr_frac"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"optim.{name} must be finite, got {getattr(self, name)}")
        if not 0 < self.lr <= 10:
            raise ConfigError(f"optim.lr must be in (0, 10], got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not 0 < self.eps < 1:
            raise ConfigError(f"optim.eps must be in (0, 1), got {self.eps}")
        if not 0 <= self.weight_decay <= 10 or self.grad_clip < 0:
            raise ConfigError("optim.weight_decay must be in [0, 10] and optim.grad_clip >= 0")
        if not 0.0 <= self.warmup_frac < 1.0 or not 0.0 <= self.min_lr_frac <= 1.0:
            raise ConfigError("optim.warmup_frac must be in [0, 1) and optim.min_lr_frac in [0, 1]")
        unread = [key for key in changed_options(self) if key not in COMMON | OPTIMIZERS[self.name].reads]
        if unread:
            readers = [n for n, e in OPTIMIZERS.items() if unread[0] in e.reads]
            raise ConfigError(f"optim.{unread[0]} is set but optim.name '{self.name}' does not read it "
                              f"(read by: {', '.join(readers) or 'none'})")


def changed_options(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted names of the (nested) fields of ``cfg`` that differ from their defaults."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += changed_options(value, f"{prefix}{f.name}.")
        elif value != f.default:
            out.append(prefix + f.name)
    return out


def upgrade_optim(optim: dict[str, Any]) -> dict[str, Any]:
    """An ``optim`` table written by ofe 0.1 (flat) with its options moved into their groups."""
    out = {k: v for k, v in optim.items() if k not in MOVED}
    for old, new in MOVED.items():
        if old in optim:
            group, leaf = new.split(".")
            out.setdefault(group, {})
            if isinstance(out[group], dict):
                out[group] = {**out[group], leaf: optim[old]}
    return out


def drop_unread(optim: dict[str, Any]) -> dict[str, Any]:
    """An ``optim`` table (today's layout) without the options its optimiser does not read: a saved
    run's settings that never acted on it (ofe 0.1 did not refuse them) load as defaults."""
    entry = OPTIMIZERS.get(optim.get("name", OptimConfig.name))
    if entry is None:
        return optim
    keep = COMMON | entry.reads
    out = {k: v for k, v in optim.items() if not isinstance(v, dict) and k in keep}
    for group, table in optim.items():
        if isinstance(table, dict):
            out[group] = {k: v for k, v in table.items() if f"{group}.{k}" in keep}
    return out
