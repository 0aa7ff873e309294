"""Quantisability during training: the perplexity cost of the simulated quantised model, measured
every N steps on a fixed held-out batch (``ofe train --quant_probe N``).

The probe quantises a copy of the model as ``ofe quantize`` does (the paper's protocol: every
activation site, one static per-tensor range from calibration; min-max weight ranges here, so a
probe costs a few forward passes, not a range search) at W8A8 and W4A4, and reports each format's
perplexity increase over the float model in percent. The float model is not changed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ofe.quant.simulate import QuantConfig, SimulatedQuantModel, perplexity

# The formats a probe measures: the log field is ``<label lower-cased>_probe_pct`` (w8a8_probe_pct, ...).
PROBE_FORMATS = (QuantConfig(weight_range="minmax"), QuantConfig(weight_bits=4, act_bits=4, weight_range="minmax"))
# Its calibration data: two batches of 8 training sequences with a seed of their own, the same at every
# probe (ofe.quant.quantize.calibration_batches draws them), so the curve follows the model, not the data.
PROBE_CALIBRATION = QuantConfig(calib_batches=2, calib_batch_size=8, seed=4321)
PROBE_WINDOWS = 16  # held-out windows: the first of the validation split


def probe_field(cfg: QuantConfig) -> str:
    """The metrics-record field of a probe format (``w8a8_probe_pct``)."""
    return f"{cfg.label.lower().replace('-', '_')}_probe_pct"


class QuantProbe:
    """Perplexity cost of each of ``formats`` on ``windows`` ``(N, T + 1)``, calibrated on ``calib``
    (a list of ``(B, T)`` token batches): the same data at every step, so the curve is the model's."""

    def __init__(self, windows: Tensor, calib: list[Tensor], formats: tuple[QuantConfig, ...] = PROBE_FORMATS) -> None:
        self.windows, self.calib, self.formats = windows, calib, formats

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict[str, float]:
        """``{field: percent}`` for every format (:func:`probe_field`); the model's mode is restored."""
        was_training = model.training
        model.eval()
        try:
            fp = perplexity(model, self.windows)
            out = {}
            for cfg in self.formats:
                sim = SimulatedQuantModel(model, cfg)
                sim.calibrate(self.calib)
                out[probe_field(cfg)] = 100.0 * (perplexity(sim, self.windows) / fp - 1.0)
            return out
        finally:
            model.train(was_training)
