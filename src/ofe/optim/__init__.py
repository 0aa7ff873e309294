"""Optimisers selected by config (AdamW, AdaFactor, SOAP, rotated AdaFactor), weight-decay groups, schedule."""

from ofe.optim.adafactor import Adafactor
from ofe.optim.build import OPTIMIZERS, OptimConfig, build_optimizer, lr_at, param_groups
from ofe.optim.rotated import SOAP, RotatedAdafactor, RotatedOptimizer

__all__ = ["OPTIMIZERS", "Adafactor", "OptimConfig", "RotatedAdafactor", "RotatedOptimizer", "SOAP",
           "build_optimizer", "lr_at", "param_groups"]
