"""Optimisers selected by config (`registry`: AdamW, AdaFactor, SOAP, rotated AdaFactor, Muon), their
options (`config`), weight-decay groups (`build`) and the lr schedule (`schedule`)."""

from ofe.optim.adafactor import Adafactor
from ofe.optim.build import build_optimizer, param_groups
from ofe.optim.config import AdafactorOptions, OptimConfig, RotationOptions
from ofe.optim.registry import OPTIMIZERS
from ofe.optim.schedule import lr_at
from ofe.optim.rotated import SOAP, AdamRule, AdafactorRule, RotatedAdafactor, RotatedOptimizer

__all__ = ["OPTIMIZERS", "Adafactor", "AdafactorOptions", "AdafactorRule", "AdamRule", "OptimConfig",
           "RotatedAdafactor", "RotatedOptimizer", "RotationOptions", "SOAP", "build_optimizer", "lr_at",
           "param_groups"]
