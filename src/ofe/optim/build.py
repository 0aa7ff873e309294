"""Build the optimiser named by the config; weight decay on matrices and embeddings only."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ofe.config import ConfigError, field


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw"] = field("adamw", "optimiser")
    lr: float = field(1e-3, "peak learning rate")
    betas: tuple[float, ...] = field((0.9, 0.999), "Adam betas (beta1, beta2)")
    eps: float = field(1e-8, "Adam epsilon")
    weight_decay: float = field(0.1, "decoupled weight decay, applied to matrices and embeddings only")
    grad_clip: float = field(1.0, "clip the global gradient norm to this value; 0 disables")
    warmup_frac: float = field(0.05, "fraction of the steps spent in linear warmup")
    decay: Literal["linear", "cosine", "constant"] = field("linear", "decay after warmup")
    min_lr_frac: float = field(0.0, "final learning rate as a fraction of the peak")

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.eps <= 0:
            raise ConfigError(f"optim.eps must be positive, got {self.eps}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.weight_decay and optim.grad_clip must be >= 0")
        if not 0.0 <= self.warmup_frac < 1.0 or not 0.0 <= self.min_lr_frac <= 1.0:
            raise ConfigError("optim.warmup_frac must be in [0, 1) and optim.min_lr_frac in [0, 1]")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed (every parameter with >= 2 dims: matrices, embeddings) and not decayed
    (biases, norm gains, beta/alpha scalars, LayerScale vectors). Tied weights appear once."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a shared (tied) tensor once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimiser over :func:`param_groups`; fused AdamW on CUDA."""
    groups = param_groups(model, cfg.weight_decay)
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def lr_at(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Learning rate for update ``step`` (0-based) of ``total_steps``: linear warmup, then decay."""
    warmup = int(cfg.warmup_frac * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.decay == "constant" or total_steps <= warmup:
        return cfg.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    floor = cfg.min_lr_frac
    shape = 1.0 - progress if cfg.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (floor + (1.0 - floor) * shape)
