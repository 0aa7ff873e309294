"""The table of optimisers: name -> how to build it from an :class:`~ofe.optim.config.OptimConfig`
and which of its options it reads.

Adding an optimiser is one module with its class and one entry here; ``--optim.name``'s choices,
its ``--help`` and the error for an unknown name come from this table, and setting an option that
the chosen optimiser does not read is an error naming both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ofe.optim.adafactor import Adafactor
from ofe.optim.muon import MuonAdamW
from ofe.optim.rotated import SOAP, RotatedAdafactor



class OptimSettings(Protocol):
    """What a builder reads of :class:`ofe.optim.config.OptimConfig` (that module imports this table;
    this one does not import it back)."""

    name: str
    lr: float
    betas: tuple[float, ...]
    eps: float
    bias_correction: bool
    adafactor: Any
    rotation: Any
    muon: Any

Groups = list[dict[str, Any]]  # from ofe.optim.build.param_groups: matrices, embeddings, the rest

# Options every optimiser honours: the trainer applies the schedule and the gradient clipping,
# and weight decay is set per parameter group.
COMMON = frozenset({"name", "lr", "betas", "weight_decay", "grad_clip", "warmup_frac", "decay", "min_lr_frac"})
ROTATION = frozenset({"rotation.shampoo_beta", "rotation.precondition_frequency", "rotation.max_precond_dim",
                      "rotation.embedding_max_precond_dim", "rotation.matmul_dtype",
                      "rotation.fused"})


@dataclass(frozen=True)
class OptimizerEntry:
    build: Callable[[OptimSettings, Groups], torch.optim.Optimizer]
    reads: frozenset[str]  # options beyond COMMON, dotted below ``optim.``
    help: str
    # Steps on FSDP2's sharded parameters (elementwise on each shard); SOAP, the rotated AdaFactor and
    # Muon need whole matrices (eigenbases, orthogonalisation), AdaFactor whole rows and columns.
    shards: bool = False


def _adamw(cfg: OptimSettings, groups: Groups) -> torch.optim.Optimizer:
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def _adafactor(cfg: OptimSettings, groups: Groups) -> torch.optim.Optimizer:
    a = cfg.adafactor
    beta1, beta2 = cfg.betas
    return Adafactor(groups, lr=cfg.lr, beta1=beta1, beta2=beta2, beta2_decay=a.beta2_decay, eps1=a.eps1, eps2=a.eps2,
                     d=a.clip_threshold, momentum=a.momentum, relative_step=a.relative_step,
                     scale_parameter=a.scale_parameter, bias_correction=cfg.bias_correction)


def _rotation_kwargs(cfg: OptimSettings, groups: Groups) -> dict[str, Any]:
    """Options shared by the rotated optimisers; embeddings get their own rotation limit."""
    r = cfg.rotation
    embed_dim = r.embedding_max_precond_dim if r.embedding_max_precond_dim is not None else r.max_precond_dim
    for g in groups:
        g["max_precond_dim"] = embed_dim if g["kind"] == "embedding" else r.max_precond_dim
    return dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, shampoo_beta=r.shampoo_beta,
                precondition_frequency=r.precondition_frequency, max_precond_dim=r.max_precond_dim,
                bias_correction=cfg.bias_correction, matmul_dtype=getattr(torch, r.matmul_dtype), fused=r.fused)


def _soap(cfg: OptimSettings, groups: Groups) -> torch.optim.Optimizer:
    return SOAP(groups, **_rotation_kwargs(cfg, groups))


def _rotated_adafactor(cfg: OptimSettings, groups: Groups) -> torch.optim.Optimizer:
    a = cfg.adafactor
    return RotatedAdafactor(groups, beta2_decay=a.beta2_decay, eps1=a.eps1, d=a.clip_threshold,
                            **_rotation_kwargs(cfg, groups))


def _muon(cfg: OptimSettings, groups: Groups) -> torch.optim.Optimizer:
    m = cfg.muon
    return MuonAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, momentum=m.momentum,  # type: ignore[return-value]
                     nesterov=m.nesterov, ns_steps=m.ns_steps, adjust_lr_fn=m.adjust_lr)


OPTIMIZERS: dict[str, OptimizerEntry] = {
    "adamw": OptimizerEntry(_adamw, frozenset({"eps"}), "AdamW (torch.optim; fused on CUDA)", shards=True),
    "adafactor": OptimizerEntry(
        _adafactor,
        frozenset({"bias_correction", "adafactor.beta2_decay", "adafactor.momentum", "adafactor.clip_threshold",
                   "adafactor.relative_step", "adafactor.scale_parameter", "adafactor.eps1", "adafactor.eps2"}),
        "AdaFactor: factored second moments, update clipping, optional momentum"),
    "soap": OptimizerEntry(_soap, frozenset({"eps", "bias_correction"}) | ROTATION,
                           "SOAP: Adam in Shampoo's eigenbasis (Vyas et al. 2024)"),
    "rotated-adafactor": OptimizerEntry(
        _rotated_adafactor,
        frozenset({"eps", "bias_correction", "adafactor.beta2_decay", "adafactor.eps1", "adafactor.clip_threshold"}) | ROTATION,
        "AdaFactor's rule in Shampoo's eigenbasis (the paper's rotated AdaFactor)"),
    "muon": OptimizerEntry(_muon, frozenset({"eps", "muon.momentum", "muon.nesterov", "muon.ns_steps", "muon.adjust_lr"}),
                           "Muon (torch.optim.Muon: orthogonalised momentum) for the hidden matrices, AdamW for "
                           "embeddings, gains and biases"),
}
