"""Quantisability during training: the perplexity cost of the simulated quantised model, measured
every N steps on a fixed held-out batch (``ofe train --quant_probe N``).

The probe quantises a copy of the model as ``ofe quantize`` does (the paper's protocol: every
activation site, one static per-tensor range from calibration; min-max weight ranges here, so a
probe costs a few forward passes, not a range search) at W8A8 and W4A4, and reports each format's
perplexity increase over the float model in percent. The float model is not changed.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ofe.models import GPT
from ofe.monitor import find_block_stack
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


def model_sites(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Where :class:`SimulatedQuantModel` quantises ``model``: an ``ofe`` GPT at every protocol site
    (its defaults); any other model (a Hugging Face causal LM) at the inputs of its linear layers and
    the outputs of its blocks (the residual stream), with its LM head kept in float, as ``ofe audit``
    does. Returns the keyword arguments ``float_modules`` / ``output_modules``."""
    if isinstance(model, GPT):
        return {}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    head_name = next((n for n, m in model.named_modules() if m is head), "") if head is not None else ""
    stack_name, stack = find_block_stack(model)
    return {"float_modules": (head_name,) if head_name else (),
            "output_modules": tuple(f"{stack_name}.{i}" for i in range(len(stack)))}


def formats_for(model: nn.Module, formats: tuple[QuantConfig, ...]) -> tuple[QuantConfig, ...]:
    """``formats`` as they apply to ``model``: only an ``ofe`` GPT has the protocol's full site list,
    other models are quantised at their linear layers' inputs."""
    if isinstance(model, GPT):
        return formats
    return tuple(dataclasses.replace(f, sites="linear-inputs") for f in formats)


class QuantProbe:
    """Perplexity cost of each of ``formats`` on ``windows`` ``(N, T + 1)``, calibrated on ``calib``
    (a list of ``(B, T)`` token batches): the same data at every step, so the curve is the model's.
    Works on an ``ofe`` GPT and on a Hugging Face causal LM (:func:`model_sites`)."""

    def __init__(self, windows: Tensor, calib: list[Tensor], formats: tuple[QuantConfig, ...] = PROBE_FORMATS) -> None:
        if windows.dim() != 2 or windows.shape[1] < 2 or not len(windows):
            raise ValueError(f"probe windows must be (N, T + 1) token ids with N >= 1, T >= 1; got {tuple(windows.shape)}")
        if not calib or any(b.dim() != 2 for b in calib):
            raise ValueError("probe calibration must be a non-empty list of (B, T) token batches")
        self.windows, self.calib, self.formats = windows, calib, formats

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict[str, float]:
        """``{field: percent}`` for every format (:func:`probe_field`); the model's mode is restored."""
        was_training = model.training
        model.eval()
        try:
            fp = perplexity(model, self.windows)
            out = {}
            sites = model_sites(model)
            for cfg in formats_for(model, self.formats):
                sim = SimulatedQuantModel(model, cfg, **sites)
                sim.calibrate(self.calib)
                out[probe_field(cfg)] = 100.0 * (perplexity(sim, self.windows) / fp - 1.0)
            return out
        finally:
            model.train(was_training)
