"""A GPT-style decoder with every block the paper compares, readable in one sitting.

Blocks (``GPTConfig.block``):

* ``pre-ln`` / ``pre-rms`` / ``pre-srms``: ``x += beta * Attn(N(x)); x += beta * MLP(N(x))`` with
  LayerNorm, RMSNorm, or RMSNorm without a trainable gain.
* ``post-ln``: ``x = LN(x + beta * Attn(x)); x = LN(x + beta * MLP(x))``.
* ``op`` (Outlier Protected): no norm in the block, ``x += beta * Attn(x); x += beta * MLP(x)``,
  entropy regulated by QK-norm; optionally a LayerNorm on the first block's attention input.

Observation points (:class:`Tap`) sit at every activation the W8A8 protocol quantises: the embedding
sum, every norm output, q/k/v, attention scores/probabilities/context, the attention and MLP outputs,
the MLP hidden activation, both residual sums of each block and the final norm. A tap costs one
attribute check unless enabled; an enabled tap passes its tensor through forward hooks, which may
observe it (the monitor) or replace it (fake quantisation). The attention probabilities are only
materialised when their tap is enabled, so the model runs at full speed (and compiles to one graph)
when nobody is watching.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ofe.models.config import GPTConfig


class Tap(nn.Module):
    """A named activation site: identity, called only while ``enabled``, so its forward hooks see the
    tensor and may return a replacement (the model uses what the tap returns).

    ``max_batch``: for a site that costs extra work to materialise when only observed (attention
    probabilities under SDPA), compute it for the first ``max_batch`` sequences only (None: all);
    with ``batch_rank`` r (a data-parallel rank whose batch is the r-th slice of the global batch),
    for those of the global batch's first ``max_batch`` that this process holds (:meth:`rows`).
    ``transform``: the site's value is used downstream (e.g. quantised attention scores and
    probabilities), so attention takes the explicit-softmax path instead of SDPA.
    """

    def __init__(self) -> None:
        super().__init__()
        self.enabled = False
        self.transform = False
        self.max_batch: int | None = None
        self.batch_rank = 0

    def rows(self, batch: int) -> int:
        """How many of this process's ``batch`` sequences to materialise (see ``max_batch``)."""
        if self.max_batch is None:
            return batch
        return max(0, min(batch, self.max_batch - self.batch_rank * batch))

    def forward(self, x: Tensor) -> Tensor:
        return x


def _causal_bias_uncached(T: int, device: torch.device) -> Tensor:
    """``(T, T)`` float32: 0 on and below the diagonal, -inf above."""
    return torch.full((T, T), float("-inf"), device=device).triu(1)


# Made once per length and device in eager mode (a compiled graph builds it inside the graph).
_causal_bias = functools.lru_cache(maxsize=16)(_causal_bias_uncached)


def through(tap: Tap | None, x: Tensor) -> Tensor:
    """``x`` routed through ``tap`` when it is enabled (hooks may replace it), else ``x`` untouched."""
    return tap(x) if tap is not None and tap.enabled else x


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """``layernorm`` | ``rms`` (trainable gain) | ``srms`` (no trainable parameter)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rms":
        return nn.RMSNorm(dim, eps=eps)
    if kind == "srms":
        return nn.RMSNorm(dim, eps=eps, elementwise_affine=False)
    raise ValueError(f"unknown norm kind {kind!r}")


def _causal_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention ``(B, H, T, d_head)`` x 3 -> ``(B, H, T, d_head)``: ``F.scaled_dot_product_attention``,
    except on CPU in bfloat16, where it is written out (bf16 products, softmax of bf16 logits with
    float accumulation, probabilities rounded to bf16 for the value product, as flash attention does).
    There torch 2.13's flash kernel's backward took 43% of a small-cpu step, and its math kernel
    computes in float32 and spends the time converting (B, H, T, T) tensors; the written-out form
    runs attention forward + backward ~3x faster than the math kernel (docs/results/performance/roofline.md)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        T = q.shape[-2]
        mask = torch.full((T, T), float("-inf"), device=q.device, dtype=q.dtype).triu(1)
        scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
        return torch.softmax(scores + mask, dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


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
        self.gate_shape = (cfg.n_head, 1) if cfg.gate == "head" else (cfg.n_head, cfg.head_dim)
        gates = cfg.n_head if cfg.gate == "head" else cfg.d_model
        self.gate = nn.Linear(cfg.d_model, gates, bias=cfg.bias) if cfg.gated_attention else None
        self.q_tap, self.k_tap, self.v_tap = Tap(), Tap(), Tap()
        self.scores_tap, self.probs_tap, self.context_tap = Tap(), Tap(), Tap()

    def _scores(self, q: Tensor, k: Tensor) -> Tensor:
        """Scaled (and soft-capped) attention logits ``(B, H, T, T)`` in float32, before the mask."""
        scores = (q.float() * (1.0 / math.sqrt(self.head_dim))) @ k.float().transpose(-2, -1)
        if self.softcap is not None:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        return scores

    @staticmethod
    def _softmax_causal(scores: Tensor) -> Tensor:
        T = scores.shape[-1]
        bias = _causal_bias_uncached(T, scores.device) if torch.compiler.is_compiling() else _causal_bias(T, scores.device)
        return (scores + bias).softmax(-1)

    def _probs(self, q: Tensor, k: Tensor) -> Tensor:
        """Attention probabilities ``(B, H, T, T)`` in float32, computed explicitly."""
        return self._softmax_causal(self._scores(q, k))

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, T, d)`` -> ``(B, T, d)``."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(C, dim=-1))
        if self.q_norm is not None:  # in float32: under CPU bf16 autocast a bf16 input with the float32
            # gain falls off torch's fused kernel (slow); in float32 training this changes nothing
            q, k = self.q_norm(q.float()).to(v.dtype), self.k_norm(k.float()).to(v.dtype)
        q, k, v = through(self.q_tap, q), through(self.k_tap, k), through(self.v_tap, v)
        explicit = self.softcap is not None or self.scores_tap.transform or self.probs_tap.transform
        if not explicit:
            y = _causal_sdpa(q, k, v)
            if self.probs_tap.enabled:  # observed only: computed on the side, not used
                n = self.probs_tap.rows(B)
                with torch.no_grad():
                    self.probs_tap(self._probs(q[:n].detach(), k[:n].detach()))
        else:  # SDPA has no soft-cap and no access to scores/probabilities: materialise them
            scores = through(self.scores_tap, self._scores(q, k))
            probs = self._softmax_causal(scores)
            probs = (self.probs_tap(probs) if self.probs_tap.enabled else probs).to(v.dtype)
            y = probs @ v
        y = through(self.context_tap, y)
        if self.gate is not None:  # (B, T, H, 1 or d_head) -> (B, H, T, 1 or d_head), like y
            y = y * torch.sigmoid(self.gate(x)).view(B, T, *self.gate_shape).transpose(1, 2)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """``proj(act(fc(alpha * x)))`` with an optional trainable input scale ``alpha``; for SwiGLU ``fc``
    has two halves and ``act(gate, up) = silu(gate) * up``. The hidden tap sees ``act``'s output."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.glu = cfg.activation == "swiglu"
        self.fc = nn.Linear(cfg.d_model, (2 if self.glu else 1) * cfg.mlp_width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_width, cfg.d_model, bias=cfg.bias)
        self.act = nn.ReLU() if cfg.activation == "relu" else nn.GELU() if cfg.activation == "gelu" else nn.SiLU()
        self.alpha = nn.Parameter(torch.ones(())) if cfg.mlp_alpha else None
        self.hidden_tap, self.out_tap = Tap(), Tap()

    def forward(self, x: Tensor) -> Tensor:
        if self.alpha is not None:
            x = self.alpha * x
        if self.glu:
            gate, up = self.fc(x).chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(self.fc(x))
        return through(self.out_tap, self.proj(through(self.hidden_tap, h)))


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
        self.placement = cfg.spec.placement
        norm = lambda: make_norm(cfg.norm_kind, cfg.d_model, cfg.norm_eps, cfg.bias)  # noqa: E731
        self.norm1, self.norm2 = (nn.Identity(), nn.Identity()) if self.placement == "none" else (norm(), norm())
        # The authors' OP code normalises only the first block's attention input, not the stream.
        self.first_norm = norm() if (layer == 0 and cfg.first_norm) else nn.Identity()
        self.attn, self.mlp = Attention(cfg), MLP(cfg)
        self.attn_gain, self.mlp_gain = BranchGain(cfg), BranchGain(cfg)
        pre = self.placement == "pre"
        # Norm-output taps only where a norm acts (post-ln's norm outputs are its residual sums).
        self.norm1_tap = Tap() if pre or not isinstance(self.first_norm, nn.Identity) else None
        self.norm2_tap = Tap() if pre else None
        self.attn_tap, self.resid_mid_tap, self.resid_tap = Tap(), Tap(), Tap()

    def _attn(self, x: Tensor) -> Tensor:
        return self.attn_gain(through(self.attn_tap, self.attn(x)))

    def forward(self, x: Tensor) -> Tensor:
        """``x``: residual stream ``(B, T, d)`` -> ``(B, T, d)``."""
        if self.placement == "post":
            a_in = through(self.norm1_tap, self.first_norm(x))
            x = through(self.resid_mid_tap, self.norm1(x + self._attn(a_in)))
            x = self.norm2(x + self.mlp_gain(self.mlp(x)))
        else:  # pre-norm blocks; "none" (op) has Identity norms
            x = x + self._attn(through(self.norm1_tap, self.norm1(self.first_norm(x))))
            x = through(self.resid_mid_tap, x)
            x = x + self.mlp_gain(self.mlp(through(self.norm2_tap, self.norm2(x))))
        return through(self.resid_tap, x)


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
        self.embed_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False) if cfg.embed_proj else None
        self.emb_tap = Tap()
        self.final_norm_tap = Tap() if cfg.final_norm else None
        self.apply(self._init_weights)
        if self.embed_proj is not None:  # starts as the identity: the model at init is the one without it
            nn.init.eye_(self.embed_proj.weight)
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
        x = through(self.emb_tap, x if self.embed_proj is None else self.embed_proj(x))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(through(self.final_norm_tap, self.final_norm(x)))

    def num_params(self) -> int:
        """Number of distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def taps(self) -> dict[str, dict[int, Tap]]:
        """Activation sites by name and layer index (model-level sites use layer 0).

        ``emb`` (token + position sum), per block ``norm1_out`` / ``norm2_out`` (where a norm acts),
        ``q``, ``k``, ``v`` (``(B, H, T, d_head)``, after QK-norm), ``attn_scores`` and
        ``attn_probs`` (``(B, H, T, T)``; scores before the causal mask), ``attn_context``,
        ``attn_out`` (attention branch output before beta), ``resid_mid`` (after the attention
        residual sum), ``mlp_hidden`` (after the nonlinearity), ``mlp_out``, ``resid`` (the residual
        stream after the block), and ``final_norm_out`` when the model has a final norm.
        """
        sites: dict[str, dict[int, Tap]] = {"emb": {0: self.emb_tap}}
        for i, b in enumerate(self.blocks):
            per_block = {
                "norm1_out": b.norm1_tap, "q": b.attn.q_tap, "k": b.attn.k_tap, "v": b.attn.v_tap,
                "attn_scores": b.attn.scores_tap, "attn_probs": b.attn.probs_tap, "attn_context": b.attn.context_tap,
                "attn_out": b.attn_tap, "resid_mid": b.resid_mid_tap, "norm2_out": b.norm2_tap,
                "mlp_hidden": b.mlp.hidden_tap, "mlp_out": b.mlp.out_tap, "resid": b.resid_tap,
            }
            for name, tap in per_block.items():
                if tap is not None:
                    sites.setdefault(name, {})[i] = tap
        if self.final_norm_tap is not None:
            sites["final_norm_out"] = {0: self.final_norm_tap}
        return sites


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy in nats; ``logits`` ``(B, T, V)``, ``targets`` ``(B, T)``."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
