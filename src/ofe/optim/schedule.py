"""The learning-rate schedule: linear warmup, then constant, linear or cosine decay to a floor."""

from __future__ import annotations

import math

from ofe.optim.config import OptimConfig


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
