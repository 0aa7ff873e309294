"""A GPT-style decoder with every block the paper compares, readable in one sitting.

Blocks (``GPTConfig.block``):

* ``pre-ln`` / ``pre-rms`` / ``pre-srms``: ``x += beta * Attn(N(x)); x += beta * MLP(N(x))`` with
  LayerNorm, RMSNorm, or RMSNorm without a trainable gain.
* ``post-ln``: ``x = LN(x + beta * Attn(x)); x = LN(x + beta * MLP(x))``.
* ``op`` (Outlier Protected): no norm in the block, ``x += beta * Attn(x); x += beta * MLP(x)``,
  entropy regulated by QK-norm; optionally a LayerNorm on the first block's attention input.

Observation points (:class:`Tap`) sit at the residual stream after every block, the attention
output, the MLP hidden activation and the attention probabilities. A tap costs one attribute
check unless a monitor has enabled it, and the probabilities are only computed when their tap is
enabled, so the model runs at full speed (and compiles to one graph) when nobody is watching.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ofe.models.config import GPTConfig


class Tap(nn.Module):
    """A named observation point: identity, called only while ``enabled`` so hooks see the tensor.

    Monitors register forward hooks on taps and flip ``enabled`` on the steps they are due. For a
    site that costs extra work to materialise (attention probabilities), ``max_batch`` asks the
    model to compute it for the first ``max_batch`` sequences only (None: all).
    """

    def __init__(self) -> None:
        super().__init__()
        self.enabled = False
        self.max_batch: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        return x


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """``layernorm`` | ``rms`` (trainable gain) | ``srms`` (no trainable parameter)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rms":
        return nn.RMSNorm(dim, eps=eps)
    if kind == "srms":
        return nn.RMSNorm(dim, eps=eps, elementwise_affine=False)
    raise ValueError(f"unknown norm kind {kind!r}")


class Attention(nn.Module):
    """Causal multi-head self-attention with optional QK-norm, logit soft-cap and per-head gate."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.softcap = cfg.attn_softcap
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        if cfg.qk_norm == "none":
            self.q_norm = self.k_norm = None
        else:
            kind = "rms" if cfg.qk_norm == "rms" else "layernorm"
            self.q_norm = make_norm(kind, cfg.head_dim, cfg.norm_eps, bias=True)
            self.k_norm = make_norm(kind, cfg.head_dim, cfg.norm_eps, bias=True)
        self.gate = nn.Linear(cfg.d_model, cfg.n_head, bias=cfg.bias) if cfg.gated_attention else None
        self.probs_tap = Tap()

    def _probs(self, q: Tensor, k: Tensor) -> Tensor:
        """Attention probabilities ``(B, H, T, T)`` in float32, computed explicitly."""
        T = q.shape[-2]
        scores = (q.float() * (1.0 / math.sqrt(self.head_dim))) @ k.float().transpose(-2, -1)
        if self.softcap is not None:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        scores += torch.full((T, T), float("-inf"), device=q.device).triu(1)  # causal mask
        return scores.softmax(-1)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, T, d)`` -> ``(B, T, d)``."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(C, dim=-1))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.softcap is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if self.probs_tap.enabled:
                n = self.probs_tap.max_batch or B
                with torch.no_grad():
                    self.probs_tap(self._probs(q[:n].detach(), k[:n].detach()))
        else:  # SDPA has no soft-cap: materialise the probabilities
            probs = self._probs(q, k).to(v.dtype)
            y = probs @ v
            if self.probs_tap.enabled:
                self.probs_tap(probs[: self.probs_tap.max_batch].detach())
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x)).transpose(1, 2).unsqueeze(-1)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """``proj(act(fc(alpha * x)))`` with an optional trainable input scale ``alpha``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_width, cfg.d_model, bias=cfg.bias)
        self.act = nn.ReLU() if cfg.activation == "relu" else nn.GELU()
        self.alpha = nn.Parameter(torch.ones(())) if cfg.mlp_alpha else None
        self.hidden_tap = Tap()

    def forward(self, x: Tensor) -> Tensor:
        if self.alpha is not None:
            x = self.alpha * x
        h = self.act(self.fc(x))
        if self.hidden_tap.enabled:
            self.hidden_tap(h.detach())
        return self.proj(h)


class BranchGain(nn.Module):
    """Scales a residual branch: beta (fixed float or trainable scalar) and optional LayerScale."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.beta: float | nn.Parameter = nn.Parameter(torch.tensor(cfg.beta)) if cfg.beta_trainable else cfg.beta
        self.layerscale = nn.Parameter(torch.full((cfg.d_model,), cfg.layerscale)) if cfg.layerscale else None

    def forward(self, y: Tensor) -> Tensor:
        if self.layerscale is not None:
            y = y * self.layerscale
        return y if isinstance(self.beta, float) and self.beta == 1.0 else self.beta * y


class Block(nn.Module):
    """One transformer block of type ``cfg.block`` (``cfg`` must be resolved)."""

    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.kind = cfg.block
        norm = lambda: make_norm(cfg.norm_kind, cfg.d_model, cfg.norm_eps, cfg.bias)  # noqa: E731
        self.norm1, self.norm2 = (nn.Identity(), nn.Identity()) if cfg.is_op else (norm(), norm())
        # The authors' OP code normalises only the first block's attention input, not the stream.
        self.first_norm = norm() if (layer == 0 and cfg.first_norm) else nn.Identity()
        self.attn, self.mlp = Attention(cfg), MLP(cfg)
        self.attn_gain, self.mlp_gain = BranchGain(cfg), BranchGain(cfg)
        self.attn_tap, self.resid_tap = Tap(), Tap()

    def _attn(self, x: Tensor) -> Tensor:
        a = self.attn(x)
        if self.attn_tap.enabled:
            self.attn_tap(a.detach())
        return self.attn_gain(a)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: residual stream ``(B, T, d)`` -> ``(B, T, d)``."""
        if self.kind == "post-ln":
            x = self.norm1(x + self._attn(self.first_norm(x)))
            x = self.norm2(x + self.mlp_gain(self.mlp(x)))
        else:  # pre-norm blocks; op has Identity norms
            x = x + self._attn(self.norm1(self.first_norm(x)))
            x = x + self.mlp_gain(self.mlp(self.norm2(x)))
        if self.resid_tap.enabled:
            self.resid_tap(x.detach())
        return x


class GPT(nn.Module):
    """Decoder-only language model. ``forward(idx)`` maps token ids ``(B, T)`` to logits ``(B, T, vocab)``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg = cfg.resolved()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        norm_kind = cfg.norm_kind
        self.final_norm = make_norm(norm_kind, cfg.d_model, cfg.norm_eps, cfg.bias) if cfg.final_norm else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[-1]
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's seq_len {self.cfg.seq_len}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.final_norm(x))

    def num_params(self) -> int:
        """Number of distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def taps(self) -> dict[str, dict[int, Tap]]:
        """Observation points by site name and layer index.

        Sites: ``resid`` (residual stream after each block), ``attn_out`` (attention branch output
        before beta), ``mlp_hidden`` (MLP activation), ``attn_probs`` (``(B, H, T, T)``).
        """
        sites: dict[str, dict[int, Tap]] = {"resid": {}, "attn_out": {}, "mlp_hidden": {}, "attn_probs": {}}
        for i, block in enumerate(self.blocks):
            sites["resid"][i] = block.resid_tap
            sites["attn_out"][i] = block.attn_tap
            sites["mlp_hidden"][i] = block.mlp.hidden_tap
            sites["attn_probs"][i] = block.attn.probs_tap
        return sites


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy in nats; ``logits`` ``(B, T, V)``, ``targets`` ``(B, T)``."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
