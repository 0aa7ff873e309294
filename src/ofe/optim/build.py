"""Build the optimiser named by the config; weight decay on matrices and embeddings only."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ofe.config import ConfigError, field
from ofe.optim.adafactor import Adafactor
from ofe.optim.rotated import RotatedAdafactor, SOAP

OPTIMIZERS = ("adamw", "adafactor", "soap", "rotated-adafactor")


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "adafactor", "soap", "rotated-adafactor"] = field("adamw", "optimiser")
    lr: float = field(1e-3, "peak learning rate (adafactor with relative_step: its cap)")
    betas: tuple[float, ...] = field((0.9, 0.999), "(beta1, beta2); beta2 is adafactor's only when beta2_decay is none")
    eps: float = field(1e-8, "epsilon of Adam's denominator (adamw, soap, rotated-adafactor)")
    weight_decay: float = field(0.1, "decoupled weight decay, applied to matrices and embeddings only")
    grad_clip: float = field(1.0, "clip the global gradient norm to this value; 0 disables")
    warmup_frac: float = field(0.05, "fraction of the steps spent in linear warmup")
    decay: Literal["linear", "cosine", "constant"] = field("linear", "decay after warmup")
    min_lr_frac: float = field(0.0, "final learning rate as a fraction of the peak")
    # AdaFactor (also the rule of rotated-adafactor)
    beta2_decay: float | None = field(-0.8, "adafactor: beta2_t = 1 - t**beta2_decay; none: constant betas[1]")
    momentum: bool = field(True, "adafactor: keep a first moment with betas[0]")
    clip_threshold: float = field(1.0, "adafactor / rotated-adafactor: update clipping threshold d (RMS); 0 disables")
    relative_step: bool = field(False, "adafactor: step min(lr, 1/sqrt(t)) instead of the scheduled lr")
    scale_parameter: bool = field(False, "adafactor: scale the step by max(eps2, RMS(parameter))")
    eps1: float = field(1e-30, "adafactor: added to squared gradients")
    eps2: float = field(1e-3, "adafactor: floor of the parameter scale")
    # SOAP / rotated AdaFactor
    shampoo_beta: float | None = field(None, "soap / rotated-adafactor: EMA decay of the Kronecker factors; none: betas[1]")
    precondition_frequency: int = field(10, "soap / rotated-adafactor: refresh the eigenbases every this many steps")
    max_precond_dim: int = field(10000, "soap / rotated-adafactor: sides longer than this are not rotated")
    embedding_max_precond_dim: int | None = field(None, "the same for embeddings (e.g. the model width, to rotate only that side); none: max_precond_dim")
    bias_correction: bool = field(True, "Adam-style bias correction of the moments")

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.eps <= 0 or self.eps1 < 0 or self.eps2 < 0:
            raise ConfigError(f"optim.eps must be positive and optim.eps1, optim.eps2 non-negative")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.clip_threshold < 0:
            raise ConfigError("optim.weight_decay, optim.grad_clip and optim.clip_threshold must be >= 0")
        if not 0.0 <= self.warmup_frac < 1.0 or not 0.0 <= self.min_lr_frac <= 1.0:
            raise ConfigError("optim.warmup_frac must be in [0, 1) and optim.min_lr_frac in [0, 1]")
        if self.beta2_decay is not None and self.beta2_decay >= 0:
            raise ConfigError(f"optim.beta2_decay must be negative (or none), got {self.beta2_decay}")
        if self.shampoo_beta is not None and not 0.0 <= self.shampoo_beta < 1.0:
            raise ConfigError(f"optim.shampoo_beta must be in [0, 1), got {self.shampoo_beta}")
        if self.precondition_frequency < 1 or self.max_precond_dim < 0:
            raise ConfigError("optim.precondition_frequency must be >= 1 and optim.max_precond_dim >= 0")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Three groups: matrices (decayed), embeddings (decayed; own rotation limit), and the rest,
    not decayed (biases, norm gains, beta/alpha scalars, LayerScale vectors). Tied weights appear once."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrices, embeds, rest = [], [], []
    for p in model.parameters():  # parameters() yields a shared (tied) tensor once
        if not p.requires_grad:
            continue
        if p.dim() < 2:
            rest.append(p)
        else:
            (embeds if id(p) in embeddings else matrices).append(p)
    return [
        {"params": matrices, "weight_decay": weight_decay, "kind": "matrix"},
        {"params": embeds, "weight_decay": weight_decay, "kind": "embedding"},
        {"params": rest, "weight_decay": 0.0, "kind": "other"},
    ]


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimiser over :func:`param_groups`; fused AdamW on CUDA."""
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    beta1, beta2 = cfg.betas
    if cfg.name == "adamw":
        fused = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(beta1, beta2), eps=cfg.eps, fused=fused or None)
    if cfg.name == "adafactor":
        return Adafactor(groups, lr=cfg.lr, beta1=beta1, beta2=beta2, beta2_decay=cfg.beta2_decay, eps1=cfg.eps1,
                         eps2=cfg.eps2, d=cfg.clip_threshold, momentum=cfg.momentum, relative_step=cfg.relative_step,
                         scale_parameter=cfg.scale_parameter, bias_correction=cfg.bias_correction)
    embed_dim = cfg.embedding_max_precond_dim if cfg.embedding_max_precond_dim is not None else cfg.max_precond_dim
    for g in groups:
        g["max_precond_dim"] = embed_dim if g["kind"] == "embedding" else cfg.max_precond_dim
    common = dict(lr=cfg.lr, betas=(beta1, beta2), eps=cfg.eps, shampoo_beta=cfg.shampoo_beta,
                  precondition_frequency=cfg.precondition_frequency, max_precond_dim=cfg.max_precond_dim,
                  bias_correction=cfg.bias_correction)
    if cfg.name == "soap":
        return SOAP(groups, **common)
    return RotatedAdafactor(groups, beta2_decay=cfg.beta2_decay, eps1=cfg.eps1, d=cfg.clip_threshold, **common)


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
