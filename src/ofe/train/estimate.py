"""What a run will cost before it runs: parameters, training FLOPs and memory (``ofe reproduce --dry_run``).

The model is built on PyTorch's meta device (shapes only, no memory), so the estimate works for a
1.2B-parameter preset on a laptop. Estimates, not measurements:

* **FLOPs** (PaLM's accounting, Chowdhery et al. 2022, appendix B): per token ``6 N + 12 L d T`` for the
  forward and backward pass, ``N`` the parameters that multiply (all but the position embedding, and
  the token embedding unless it is tied to the head), ``L`` layers, ``d`` width, ``T`` sequence length.
  Evaluation, the monitor and the optimiser's own work are left out.
* **Memory**: weights, gradients and the optimiser's state at 4 bytes per float (ofe keeps them in
  float32; divided by the processes under ``--parallel fsdp``, plus two gathered blocks), counted from the parameters' shapes and the optimiser's rule (SOAP: Adam's two moments plus,
  per rotated side of a matrix, a Kronecker factor and its eigenbasis); activations by Korthikanti et
  al. 2022's ``34 T b d`` bytes per layer in 16 bits (doubled for float32), without their ``5 a T^2 b``
  attention-matrix term unless attention runs through an explicit softmax (soft-capping), plus the
  logits ``b T V``; ``b`` the micro-batch per process.
"""

from __future__ import annotations

from typing import Any

import torch

from ofe.models import GPT
from ofe.resources import GIB
from ofe.run_config import TrainConfig



def meta_model(cfg: TrainConfig) -> GPT:
    """The run's model on the meta device: every shape, no storage."""
    with torch.device("meta"):
        return GPT(cfg.model)


def _rotated_floats(shape: torch.Size, limit: int) -> int:
    """SOAP / rotated AdaFactor's extra floats for one matrix: per side not longer than ``limit``, an
    ``n x n`` Kronecker factor and an ``n x n`` eigenbasis."""
    return sum(2 * n * n for n in shape if n <= limit) if len(shape) == 2 else 0


def optimizer_floats(cfg: TrainConfig, model: GPT) -> int:
    """Floats of optimiser state for ``cfg.optim`` over ``model``'s parameters."""
    name, rot = cfg.optim.name, cfg.optim.rotation
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    total = 0
    for p in model.parameters():  # a tied weight once
        n, matrix = p.numel(), p.dim() == 2
        if name == "adamw":
            total += 2 * n
        elif name in ("soap", "rotated-adafactor"):
            limit = rot.embedding_max_precond_dim if id(p) in embeddings and rot.embedding_max_precond_dim else rot.max_precond_dim
            total += (2 * n if name == "soap" else n + sum(p.shape)) + _rotated_floats(p.shape, limit)
        elif name == "adafactor":
            total += (sum(p.shape) if matrix else n) + (n if cfg.optim.adafactor.momentum else 0)
        elif name == "muon":
            total += n if matrix and id(p) not in embeddings else 2 * n  # momentum; AdamW's moments for the rest
        else:
            total += 2 * n  # an optimiser this table does not know: assume Adam-like
    return total


def estimate(cfg: TrainConfig, world_size: int = 1) -> dict[str, Any]:
    """Parameters, tokens, training FLOPs and per-process memory (GiB) of the run ``cfg`` describes."""
    model = meta_model(cfg)
    m = cfg.model
    params = sum(p.numel() for p in model.parameters())  # a tied weight once
    multiplying = params - m.seq_len * m.d_model - (0 if m.tie_embeddings else m.vocab_size * m.d_model)
    tokens = cfg.steps * cfg.batch_size * m.seq_len
    flops = (6 * multiplying + 12 * m.n_layer * m.d_model * m.seq_len) * tokens
    micro = max(1, cfg.batch_size // (cfg.grad_accum * world_size))
    bytes_per_act = 2 if cfg.dtype == "bfloat16" else 4
    per_layer = 34 * m.seq_len * micro * m.d_model * bytes_per_act / 2
    if m.attn_softcap:
        per_layer += 5 * m.n_head * m.seq_len**2 * micro * bytes_per_act / 2
    activations = m.n_layer * per_layer + 2 * micro * m.seq_len * m.vocab_size * 4
    state = {"weights": 4 * params, "gradients": 4 * params, "optimizer": 4 * optimizer_floats(cfg, model)}
    if cfg.parallel == "fsdp" and world_size > 1:
        # each process holds 1/world of the float32 state, plus the blocks being gathered: the current and
        # the prefetched one, weights and gradients each
        block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
        state = {k: v / world_size for k, v in state.items()} | {"gathered": 2 * 2 * 4 * block}
    memory = {**state, "activations": activations}
    return {"params": params, "tokens": tokens, "train_flops": flops,
            "memory_gib": {k: v / GIB for k, v in memory.items()} | {"total": sum(memory.values()) / GIB}}


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def describe(name: str, cfg: TrainConfig, est: dict[str, Any]) -> str:
    """One line of ``--dry_run`` output (memory in GiB, three significant digits)."""
    mem = est["memory_gib"]
    return (f"{name}: {_count(est['params'])} parameters, {cfg.steps:,} steps x {cfg.batch_size} x "
            f"{cfg.model.seq_len} = {_count(est['tokens'])} tokens, {est['train_flops']:.2e} FLOPs; memory "
            f"~{mem['total']:.3g} GiB (weights {mem['weights']:.3g}, gradients {mem['gradients']:.3g}, "
            f"{cfg.optim.name} state {mem['optimizer']:.3g}, activations {mem['activations']:.3g})")
