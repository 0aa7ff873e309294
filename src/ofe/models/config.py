"""`GPTConfig`, the named presets, and the closed-form parameter count."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from ofe.config import ConfigError, field
from ofe.models.blocks import BLOCKS, BlockSpec

BlockType = Literal[tuple(BLOCKS)]  # type: ignore[valid-type]
QKNormType = Literal["auto", "none", "rms", "layernorm"]
BLOCK_TYPES: tuple[str, ...] = tuple(BLOCKS)


@dataclass(frozen=True)
class GPTConfig:
    """Shape and block options of a GPT-style decoder.

    Options whose default depends on the block are ``"auto"`` / ``None`` here and resolved by
    :meth:`resolved` (the OP block gets QK-RMSNorm, a trainable beta = 1/sqrt(n_layer), a first-block
    LayerNorm and no final norm; normalised blocks get no QK-norm, beta = 1 fixed, a final norm for
    the pre-norm blocks).
    """

    vocab_size: int = field(256, "vocabulary size (256 = bytes)")
    seq_len: int = field(128, "maximum sequence length (learned positions)")
    n_layer: int = field(6, "number of blocks")
    n_head: int = field(4, "attention heads")
    d_model: int = field(256, "residual stream width")
    d_mlp: int | None = field(None, "MLP hidden width; none: 4 * d_model (gelu/relu), or 8/3 * d_model rounded up "
                                    "to a multiple of 8 (swiglu: three matrices, about the same parameters)")
    block: BlockType = field("pre-ln", "block type: " + "; ".join(f"{k}: {v.help}" for k, v in BLOCKS.items()))
    qk_norm: QKNormType = field("auto", "per-head norm of queries and keys; auto: rms for op, none otherwise")
    attn_softcap: float | None = field(None, "tanh soft-cap c of attention logits, c * tanh(z / c); none: off")
    beta: float | None = field(None, "residual branch gain; none: 1/sqrt(n_layer) for op, 1 otherwise")
    beta_trainable: bool | None = field(None, "make beta a trainable scalar per branch; none: true for op only")
    mlp_alpha: bool = field(False, "trainable scalar scaling the MLP input")
    final_norm: bool | None = field(None, "norm before the unembedding; none: on for pre-norm blocks, off for post-ln and op")
    first_norm: bool | None = field(None, "norm on the first block's attention input; none: on for op only")
    gated_attention: bool = field(False, "sigmoid gate on the attention output, computed from the attention input "
                                         "(query-dependent); its granularity is model.gate")
    gate: Literal["head", "element"] = field("head", "granularity of the attention gate: head (one scalar per head, "
                                                     "Bondarenko et al.'s gated attention) or element (one per head "
                                                     "channel: Qwen's G1 gate, arXiv 2505.06708)")
    layerscale: float | None = field(None, "LayerScale init value (per-channel gain on each branch); none: off")
    activation: Literal["relu", "gelu", "swiglu"] = field("relu", "MLP nonlinearity; swiglu: silu(x W_gate) * "
                                                                  "(x W_up), the Llama-family MLP")
    embed_proj: bool = field(False, "a learnable d x d projection of the embedding sum, initialised to the identity "
                                    "(OSP's embedding projection, arXiv 2506.19697)")
    bias: bool = field(False, "biases in linear layers and LayerNorms")
    tie_embeddings: bool = field(True, "share the token embedding with the unembedding")
    init_std: float = field(0.02, "std of the normal init of every weight matrix and embedding")
    norm_eps: float = field(1e-5, "epsilon of every norm")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_mlp is not None and self.d_mlp <= 0:
            raise ConfigError(f"model.d_mlp must be positive, got {self.d_mlp}")
        if self.d_model % self.n_head:
            raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        for name in ("attn_softcap", "layerscale", "init_std", "norm_eps"):
            value = getattr(self, name)
            if value is not None and not (0 < value <= FLOAT32_MAX):
                raise ConfigError(f"model.{name} must be a positive number a float32 holds (at most {FLOAT32_MAX:.3g}), "
                                  f"got {value}")
        if self.beta is not None and not abs(self.beta) <= FLOAT32_MAX:
            raise ConfigError(f"model.beta must be finite in float32 (|beta| <= {FLOAT32_MAX:.3g}), got {self.beta}")

    # ---- resolution of block-dependent defaults -------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def mlp_width(self) -> int:
        if self.d_mlp is not None:
            return self.d_mlp
        if self.activation == "swiglu":  # 3 matrices of d x h ~ 2 of d x 4d: h = 8d/3, a multiple of 8
            return -(-8 * self.d_model // 3 // 8) * 8
        return 4 * self.d_model

    @property
    def spec(self) -> BlockSpec:
        """The block's entry in :data:`ofe.models.blocks.BLOCKS`."""
        return BLOCKS[self.block]

    def resolved(self) -> GPTConfig:
        """Copy with every ``auto``/``None`` option replaced by the block's default."""
        spec = self.spec
        return dataclasses.replace(
            self,
            d_mlp=self.mlp_width,
            qk_norm=self.qk_norm if self.qk_norm != "auto" else spec.qk_norm,
            beta=self.beta if self.beta is not None else (1 / math.sqrt(self.n_layer) if spec.beta_inv_sqrt_depth else 1.0),
            beta_trainable=self.beta_trainable if self.beta_trainable is not None else spec.beta_trainable,
            final_norm=self.final_norm if self.final_norm is not None else spec.final_norm,
            first_norm=self.first_norm if self.first_norm is not None else spec.first_norm,
        )

    @property
    def norm_kind(self) -> Literal["layernorm", "rms", "srms"]:
        """The block's norm; also used for the optional first and final norms (LayerNorm for op)."""
        return self.spec.norm


FLOAT32_MAX = 3.4028234663852886e38  # the parameters are float32: a larger value is inf

PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: builds and runs in milliseconds.
    "tiny": dict(vocab_size=256, seq_len=32, n_layer=2, n_head=4, d_model=32),
    # `ofe reproduce` on a 2-core CPU: byte-level, ~0.84M parameters, ~0.2 s per step of 32 x 128 tokens.
    "study-cpu": dict(vocab_size=256, seq_len=128, n_layer=4, n_head=4, d_model=128),
    # Real text fast on a CPU (docs/results/studies/realtext-search.md): study-cpu at width 64, ~0.22M parameters.
    "realtext-cpu": dict(vocab_size=256, seq_len=128, n_layer=4, n_head=4, d_model=64),
    # The Bigram-Backcopy task (data.corpus bigram-backcopy): 2 blocks, ~0.43M parameters, seq 64.
    "backcopy-cpu": dict(vocab_size=256, seq_len=64, n_layer=2, n_head=4, d_model=128),
    # A byte-level CPU experiment that trains in minutes (~4.8M parameters).
    "small-cpu": dict(vocab_size=256, seq_len=128, n_layer=6, n_head=4, d_model=256),
    # The authors' CodeParrot setting: GPT-2 small shape, ReLU MLP, seq 128, tied embeddings.
    "codeparrot-130m": dict(vocab_size=32768, seq_len=128, n_layer=12, n_head=12, d_model=768),
    # Languini Books shapes at the paper's 100M / 320M / 1.2B scales (vocab 16384, seq 512).
    "languini-100m": dict(vocab_size=16384, seq_len=512, n_layer=12, n_head=12, d_model=768),
    "languini-320m": dict(vocab_size=16384, seq_len=512, n_layer=24, n_head=16, d_model=1024),
    "languini-1.2b": dict(vocab_size=16384, seq_len=512, n_layer=24, n_head=16, d_model=2048),
    # OPT-125m shape: biases, ReLU, tied embeddings, seq 2048.
    "opt-125m": dict(vocab_size=50272, seq_len=2048, n_layer=12, n_head=12, d_model=768, bias=True),
}


def preset_fields(name: Any) -> dict[str, Any]:
    """The model settings of preset ``name``: the one place that checks a preset name."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})")
    return dict(PRESETS[name])


def preset(name: str, **overrides: Any) -> GPTConfig:
    """The named preset with ``overrides`` applied; unknown names raise :class:`ConfigError`."""
    return GPTConfig(**{**preset_fields(name), **overrides})


def expected_param_count(cfg: GPTConfig) -> int:
    """Closed-form number of parameters of ``GPT(cfg)`` (a fixed beta is a constant, not a parameter)."""
    c = cfg.resolved()
    d, m, h, hd, b = c.d_model, c.mlp_width, c.n_head, c.head_dim, int(c.bias)
    norm = {"layernorm": d * (1 + b), "rms": d, "srms": 0}[c.norm_kind]
    glu = c.activation == "swiglu"
    per_block = 4 * d * d + (3 if glu else 2) * d * m + b * (4 * d + (2 * m if glu else m) + d)
    per_block += 0 if c.spec.placement == "none" else 2 * norm
    per_block += {"none": 0, "rms": 2 * hd, "layernorm": 2 * hd * 2}[c.qk_norm]  # type: ignore[index]
    gates = h if c.gate == "head" else d
    per_block += (d * gates + b * gates) if c.gated_attention else 0
    per_block += 2 if c.beta_trainable else 0
    per_block += 1 if c.mlp_alpha else 0
    per_block += 2 * d if c.layerscale is not None else 0
    total = c.n_layer * per_block + c.vocab_size * d + c.seq_len * d + (d * d if c.embed_proj else 0)
    total += 0 if c.tie_embeddings else c.vocab_size * d
    total += norm if c.first_norm else 0
    total += norm if c.final_norm else 0
    return total


def presets_table() -> str:
    """One line per preset: shape and parameter count (``ofe presets``)."""
    lines = [f"{'preset':<16} {'layers':>6} {'width':>6} {'heads':>5} {'vocab':>6} {'seq':>5} {'params (pre-ln)':>16}"]
    for name in PRESETS:
        c = preset(name)
        lines.append(f"{name:<16} {c.n_layer:>6} {c.d_model:>6} {c.n_head:>5} {c.vocab_size:>6} {c.seq_len:>5} "
                     f"{expected_param_count(c):>16,}")
    return "\n".join(lines)
