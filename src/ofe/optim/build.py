"""Build the optimiser named by the config over weight-decay groups (matrices and embeddings only)."""

from __future__ import annotations

import torch
from torch import nn

from ofe.optim.config import OptimConfig
from ofe.optim.registry import OPTIMIZERS


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
    """The optimiser named by ``cfg`` (:data:`~ofe.optim.registry.OPTIMIZERS`) over :func:`param_groups`."""
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    return OPTIMIZERS[cfg.name].build(cfg, groups)
