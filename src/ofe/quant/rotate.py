"""Hadamard rotation of a trained ``ofe`` GPT before quantisation (QuaRot / SpinQuant style).

An orthogonal rotation ``Q`` of the residual stream spreads an outlier channel over every channel,
so a per-tensor int8 range no longer has to cover one huge coordinate. :func:`rotate_model` returns
a model that computes the same function (to float rounding) with:

1. the norm gains folded into the linear layers that read the norm (q/k/v, the attention gate, the
   MLP input, the LM head, which is untied from the token embedding first), and LayerScale and the
   embedding projection folded into the weights that write the stream;
2. for LayerNorm blocks, the mean removed from everything that writes the residual stream (token and
   position embeddings, attention and MLP output projections), so the stream is always mean-free and
   each LayerNorm equals a gain-free RMSNorm, which commutes with ``Q`` (QuaRot's treatment of
   LayerNorm, after SliceGPT);
3. the stream rotated by a randomised Hadamard matrix ``Q = D H / sqrt(d)`` (``D`` random signs from
   ``seed``, applied before the transform; a random orthogonal matrix when the width is not a power
   of two): writers ``W <- Q^T W``, readers ``W <- W Q``, embeddings ``E <- E Q``;
4. the MLP hidden activation rotated online by a randomised Hadamard matrix before the down
   projection (``h <- h H``, ``W_down <- W_down H``), a forward pre-hook on the projection.

Scope: pre-norm blocks (``pre-ln``, ``pre-rms``, ``pre-srms``) without biases (``ofe``'s default). The
OP block has no norm to fold and a LayerNorm on block 0's input that a rotation does not commute
with; Post-LN normalises the stream itself. Both are refused with a message. The rotation helps
quantising *linear-layer inputs* (``quant.sites = linear-inputs``, QuaRot's setting); the attention
context (the output projection's input) is not rotated (QuaRot's head-wise Hadamard is not done).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ofe.errors import OfeError
from ofe.models.blocks import BLOCKS

ROTATABLE = tuple(name for name, spec in BLOCKS.items() if spec.rotatable)


class RotationError(OfeError, ValueError):
    """A model the rotation does not support."""


def hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """A randomised orthogonal Hadamard matrix ``(n, n)``: ``D H_n / sqrt(n)``, Sylvester's matrix with
    its *rows'* signs flipped at random (``seed``), so that ``x @ Q`` flips the signs of ``x`` before the
    Hadamard transform. (Flipping columns instead, ``H D``, would send the mean of ``x`` (the all-ones
    direction, the first column of ``H``) into one output channel: a GELU output, positive on
    average, would become a massive outlier.) ``n`` must be a power of two."""
    if n < 1 or n & (n - 1):
        raise RotationError(f"a Hadamard rotation needs a power-of-two width, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
    return (signs[:, None] * h / n**0.5).to(dtype)


def rotation(n: int, seed: int) -> Tensor:
    """:func:`hadamard` when ``n`` is a power of two, else a random orthogonal matrix (the Q of a seeded
    Gaussian's QR), float64 ``(n, n)``."""
    if n & (n - 1) == 0:
        return hadamard(n, seed)
    g = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))


def check_rotatable(model: nn.Module) -> None:
    """Raise :class:`RotationError` naming why ``model`` cannot be rotated (see the module docstring's scope)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "blocks"):
        raise RotationError("the Hadamard rotation needs an ofe GPT")
    if cfg.block not in ROTATABLE:
        raise RotationError(f"the Hadamard rotation supports the {', '.join(ROTATABLE)} blocks, not {cfg.block!r} "
                            "(no norm to fold the rotation through)")
    if cfg.bias:
        raise RotationError("the Hadamard rotation supports models without biases (model.bias = false)")
    if cfg.first_norm:
        raise RotationError("the Hadamard rotation does not support model.first_norm (two norms in a row)")
    if cfg.norm_kind == "layernorm" and not cfg.final_norm:
        raise RotationError("the Hadamard rotation of a LayerNorm model needs its final norm (the head reads the "
                            "stream, whose mean the rotation removes)")


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """A rotated copy of ``model`` (see the module docstring); ``model`` is left untouched."""
    check_rotatable(model)
    m = copy.deepcopy(model).eval()
    cfg = m.cfg
    d, dtype = cfg.d_model, m.tok_emb.weight.dtype
    layernorm = cfg.norm_kind == "layernorm"

    # 0. untie the head; fold the embedding projection into the embeddings
    m.lm_head.weight = nn.Parameter(m.lm_head.weight.detach().clone())
    tok, pos = m.tok_emb.weight.double(), m.pos_emb.weight.double()
    if m.embed_proj is not None:
        p = m.embed_proj.weight.double()
        tok, pos = tok @ p.T, pos @ p.T
        m.embed_proj = None

    def gain(norm: nn.Module) -> Tensor:
        w = getattr(norm, "weight", None)
        return torch.ones(d, dtype=torch.float64) if w is None else w.double()

    def fold_reader(linear: nn.Linear, g: Tensor) -> None:
        linear.weight.copy_((linear.weight.double() * g).to(dtype))

    # 1. norm gains into the readers; LayerScale into the writers
    for block in m.blocks:
        fold_reader(block.attn.qkv, gain(block.norm1))
        if block.attn.gate is not None:
            fold_reader(block.attn.gate, gain(block.norm1))
        fold_reader(block.mlp.fc, gain(block.norm2))
        for linear, branch in ((block.attn.proj, block.attn_gain), (block.mlp.proj, block.mlp_gain)):
            if branch.layerscale is not None:
                linear.weight.copy_((branch.layerscale.double()[:, None] * linear.weight.double()).to(dtype))
                branch.layerscale = None
    if cfg.final_norm:
        fold_reader(m.lm_head, gain(m.final_norm))

    # 2. a mean-free stream (LayerNorm blocks): centre every writer
    if layernorm:
        tok, pos = tok - tok.mean(1, keepdim=True), pos - pos.mean(1, keepdim=True)
        for block in m.blocks:
            for linear in (block.attn.proj, block.mlp.proj):
                w = linear.weight.double()
                linear.weight.copy_((w - w.mean(0, keepdim=True)).to(dtype))

    # 3. rotate the stream; every norm becomes a gain-free RMSNorm (commutes with Q)
    q = rotation(d, seed)
    m.tok_emb.weight.copy_((tok @ q).to(dtype))
    m.pos_emb.weight.copy_((pos @ q).to(dtype))
    for block in m.blocks:
        for linear in (block.attn.qkv, block.mlp.fc) + ((block.attn.gate,) if block.attn.gate is not None else ()):
            linear.weight.copy_((linear.weight.double() @ q).to(dtype))
        for linear in (block.attn.proj, block.mlp.proj):
            linear.weight.copy_((q.T @ linear.weight.double()).to(dtype))
        block.norm1 = nn.RMSNorm(d, eps=cfg.norm_eps, elementwise_affine=False)
        block.norm2 = nn.RMSNorm(d, eps=cfg.norm_eps, elementwise_affine=False)
    m.lm_head.weight.copy_((m.lm_head.weight.double() @ q).to(dtype))
    if cfg.final_norm:
        m.final_norm = nn.RMSNorm(d, eps=cfg.norm_eps, elementwise_affine=False)

    # 4. the MLP hidden activation, rotated online before the down projection
    for i, block in enumerate(m.blocks):
        h = rotation(block.mlp.proj.weight.shape[1], seed + 1 + i)
        block.mlp.proj.weight.copy_((block.mlp.proj.weight.double() @ h).to(dtype))
        block.mlp.proj.register_forward_pre_hook(_OnlineRotation(h.to(dtype)))
    return m


class _OnlineRotation:
    """A forward pre-hook that multiplies a layer's input by a fixed orthogonal matrix."""

    def __init__(self, h: Tensor) -> None:
        self.h = h

    def __call__(self, _module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (x @ self.h.to(device=x.device, dtype=x.dtype), *args[1:])
