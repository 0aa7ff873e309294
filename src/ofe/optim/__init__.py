"""Optimisers selected by config, weight-decay parameter groups, and the learning-rate schedule."""

from ofe.optim.build import OptimConfig, build_optimizer, lr_at, param_groups

__all__ = ["OptimConfig", "build_optimizer", "lr_at", "param_groups"]
