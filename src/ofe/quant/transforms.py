"""The table of post-hoc transforms: methods applied to a trained model before it is quantised.

A transform prepares the model to quantise given the calibration data and returns it (the same
module changed in place, or a new one); it may also imply quantiser settings. ``--quant.transforms``
lists them in the order they apply; :class:`ofe.quant.simulate.SimulatedQuantModel` runs them on its
private copy of the model before the weights are quantised and the activation quantisers attached;
``ofe remedies`` compares each entry on the baseline.

Adding a method is one module with its function and one entry here (``docs/extending.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn

from ofe.errors import OfeError
from ofe.quant.rotate import RotationError, check_rotatable, rotate_model
from ofe.quant.smoothquant import smooth


class QuantSettings(Protocol):
    """What transforms read of :class:`ofe.quant.simulate.QuantConfig` (that module imports this table;
    this one does not import it back). A new method's options are new fields of QuantConfig."""

    seed: int  # of the calibration batches; the rotation's random signs too
    smooth_alpha: float


class TransformError(OfeError, ValueError):
    """A model outside a transform's scope (e.g. a rotation of a block with no norm to fold it through)."""


@dataclass(frozen=True)
class TransformContext:
    """What a transform may read beside the model and the calibration batches."""

    cfg: QuantSettings  # the quantisation settings (a method's own options are fields of it, e.g. smooth_alpha)
    keep_float: frozenset[int]  # ids of the weights that stay in float (the LM head, and weights tied to it)
    notes: dict[str, Any] = field(default_factory=dict)  # what a method computed, by its name (e.g. SmoothQuant's scales)


class Prepare(Protocol):
    def __call__(self, model: nn.Module, calib: list[Tensor], ctx: TransformContext) -> nn.Module:
        """The model to quantise: ``model`` (a private float copy) changed in place, or a new module.
        ``calib``: token-id batches ``(B, T)`` from the training split."""


@dataclass(frozen=True)
class Transform:
    help: str
    expected: str  # what the literature expects of it (ofe remedies prints it)
    prepare: Prepare | None = None  # None: the method only sets quantiser options (``settings``)
    settings: Mapping[str, Any] = field(default_factory=dict)  # QuantConfig fields the method sets
    needs_calibration: bool = False  # prepare reads ``calib`` (else it runs at construction, with no data)
    linear_inputs: bool = False  # acts on linear-layer inputs: needs quant.sites = linear-inputs
    check: Callable[[nn.Module], None] | None = None  # raises TransformError when the model is out of its scope
    # folds and rotates the model's weights assuming plain layers: no transform that changes the model
    # (e.g. hooks a layer's input) may come before it
    needs_plain_model: bool = False
    label: Callable[[QuantSettings], str] = lambda cfg: ""  # suffix of the format's label (W8A8-rot)


def _smoothquant(model: nn.Module, calib: list[Tensor], ctx: TransformContext) -> nn.Module:
    ctx.notes["smoothquant"] = smooth(model, calib, ctx.cfg.smooth_alpha, set(ctx.keep_float))
    return model


def _check_hadamard(model: nn.Module) -> None:
    try:
        check_rotatable(model)
    except RotationError as e:
        raise TransformError(str(e)) from None


def _hadamard(model: nn.Module, calib: list[Tensor], ctx: TransformContext) -> nn.Module:
    return rotate_model(model, ctx.cfg.seed)


TRANSFORMS: dict[str, Transform] = {
    "smoothquant": Transform(
        "SmoothQuant: each linear's input divided and its weight multiplied per input channel by "
        "max|x|^a / max|w|^(1-a) (a = quant.smooth_alpha), calibrated", "migrates activation outliers into the "
        "weights (Xiao et al. 2023)", _smoothquant, needs_calibration=True, linear_inputs=True,
        label=lambda cfg: f"-smooth{cfg.smooth_alpha:g}"),
    "hadamard": Transform(
        "QuaRot-style rotation of the residual stream and the MLP hidden activation by randomised Hadamard "
        "matrices (same function in float; pre-norm blocks without biases)",
        "a rotation spreads outlier channels over all channels (QuaRot)", _hadamard, linear_inputs=True,
        needs_plain_model=True,
        check=_check_hadamard, label=lambda cfg: "-rot"),
    "per-token": Transform(
        "dynamic min-max activation ranges per token, per-channel weights (what deployments do)",
        "per-token dynamic activation ranges confine an outlier token to its own range",
        settings={"act_granularity": "token", "weight_granularity": "channel"}),
}
