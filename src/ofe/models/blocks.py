"""The table of block variants: name -> where its norms act, which norm, and the defaults it resolves.

The facts other modules ask about a block (is it normalised? can a rotation be folded through it?)
are properties of its :class:`BlockSpec`, never lists of names kept elsewhere.

Adding a block variant is one entry here (plus, if it needs a new norm placement, a branch in
:class:`ofe.models.gpt.Block`); ``--model.block``'s choices, its ``--help`` and the error for an unknown
name come from this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Placement = Literal["pre", "post", "none"]
NormKind = Literal["layernorm", "rms", "srms"]


@dataclass(frozen=True)
class BlockSpec:
    placement: Placement  # pre: x += f(N(x)); post: x = N(x + f(x)); none: x += f(x) (no norm in the block)
    norm: NormKind  # the block's norm; also the kind of the optional first and final norms
    help: str
    qk_norm: Literal["none", "rms"] = "none"  # default when model.qk_norm is auto
    beta_inv_sqrt_depth: bool = False  # default beta 1/sqrt(n_layer) (else 1)
    beta_trainable: bool = False  # default for model.beta_trainable
    first_norm: bool = False  # default: a norm on block 0's attention input only
    final_norm: bool = False  # default: a norm before the unembedding

    @property
    def normalised(self) -> bool:
        """Whether the block normalises (the paper's "normalised blocks", C2): every block with a norm."""
        return self.placement != "none"

    @property
    def rotatable(self) -> bool:
        """Whether a post-hoc rotation of the residual stream can be folded through the block: its
        norm reads the stream (pre-norm), so the rotation commutes with it (QuaRot)."""
        return self.placement == "pre"


BLOCKS: dict[str, BlockSpec] = {
    "pre-ln": BlockSpec("pre", "layernorm", "x += beta*f(LN(x)), final LayerNorm", final_norm=True),
    "post-ln": BlockSpec("post", "layernorm", "x = LN(x + beta*f(x))"),
    "pre-rms": BlockSpec("pre", "rms", "x += beta*f(RMSNorm(x)), final RMSNorm", final_norm=True),
    "pre-srms": BlockSpec("pre", "srms", "x += beta*f(SRMSNorm(x)) (no trainable gain), final SRMSNorm",
                          final_norm=True),
    "op": BlockSpec("none", "layernorm", "Outlier Protected: x += beta*f(x), no norm; QK-RMSNorm, trainable "
                    "beta = 1/sqrt(n_layer), LayerNorm on block 0's attention input", qk_norm="rms",
                    beta_inv_sqrt_depth=True, beta_trainable=True, first_norm=True),
}
