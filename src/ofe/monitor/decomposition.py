"""Kurtosis-update decomposition on fixed inputs (the paper's section 4): a measurement, used by training.

:class:`KurtosisUpdateTracker` runs the model on one fixed batch at every monitored step, keeps the
residual stream of each layer, and decomposes the change of each layer's kurtosis since the
previous monitored step into the terms of :func:`ofe.metrics.kurtosis_update_terms`. Because the
inputs are fixed, the change is caused by the weight updates alone, and the terms reconstruct the
new kurtosis exactly::

    kurtosis_t = (m4_{t-1} + u4_1 + u4_2 + u4_3 + u4_4) / (m2_{t-1} + u2_1 + u2_2) ** 2
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ofe import metrics as M
from ofe.monitor.capture import capture
from ofe.monitor.sites import layer_modules

TERMS = ("u2_1", "u2_2", "u4_1", "u4_2", "u4_3", "u4_4")
U4_TERMS = TERMS[2:]


class KurtosisUpdateTracker:
    """Per-layer kurtosis-update terms between consecutive :meth:`update` calls on one fixed batch.

    Args:
        model: an ``ofe`` GPT (site ``site`` of its taps) or any model with a block stack.
        batch: the fixed input, e.g. token ids ``(B, T)``; kept on the model's device.
        site: ``ofe`` models: which tap to decompose (default the residual stream after each block).

    :meth:`update` returns ``None`` the first time; afterwards ``{"m2", "m4", TERMS..., "kurtosis"}``,
    each a list with one float per layer, where ``m2``/``m4`` are the moments at the previous call,
    the terms the change since then, and ``kurtosis`` the kurtosis now (all on the fixed batch).
    """

    def __init__(self, model: nn.Module, batch: Tensor, site: str = "resid") -> None:
        self.model = model
        self.batch = batch
        self.modules = layer_modules(model, site)
        self.previous: list[Tensor] | None = None

    @torch.no_grad()
    def capture(self) -> list[Tensor]:
        """The per-layer activations on the fixed batch now, as float32 ``(n, d)`` matrices."""
        was_training = self.model.training
        enabled = [getattr(m, "enabled", None) for m in self.modules]
        matrix = lambda out: out.detach().float().reshape(-1, out.shape[-1]).clone()  # noqa: E731
        try:
            for m in self.modules:
                if hasattr(m, "enabled"):
                    m.enabled = True
            self.model.eval()
            with capture(self.modules, keep=matrix) as captured:
                self.model(self.batch)
        finally:
            for m, flag in zip(self.modules, enabled):
                if flag is not None:
                    m.enabled = flag
            self.model.train(was_training)
        missing = [layer for layer, x in enumerate(captured) if x is None]
        if missing:
            raise RuntimeError(f"layers {missing} produced no activation on the fixed batch")
        return captured

    def update(self) -> dict[str, list[float]] | None:
        current = self.capture()
        previous, self.previous = self.previous, current
        if previous is None:
            return None
        keys = ("m2", "m4", *TERMS)
        per_layer = []
        for x, x_new in zip(previous, current):
            terms = M.kurtosis_update_terms(x, x_new)
            per_layer.append(torch.stack([*(terms[k] for k in keys), M.kurtosis(x_new.double())]))
        table = torch.stack(per_layer, 1).cpu().tolist()  # (keys + kurtosis, L): one device-to-host copy
        return dict(zip((*keys, "kurtosis"), table))

    def state_dict(self) -> dict[str, Any]:
        return {"previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        prev = state.get("previous")
        self.previous = None if prev is None else [t.to(self.batch.device) for t in prev]


def reconstructed_kurtosis(terms: dict[str, list[float]]) -> list[float]:
    """Kurtosis after the update, per layer, from the previous moments and the six terms alone."""
    out = []
    for layer in range(len(terms["m2"])):
        m2 = terms["m2"][layer] + terms["u2_1"][layer] + terms["u2_2"][layer]
        m4 = terms["m4"][layer] + sum(terms[k][layer] for k in U4_TERMS)
        out.append(m4 / m2**2)
    return out


def kurtosis_change_contributions(terms: dict[str, list[float]]) -> dict[str, list[float]]:
    """Split each layer's kurtosis change over the interval exactly into the terms' contributions.

    With ``M2 = m2 + u2_1 + u2_2`` the new second moment,
    ``Kurt_new - Kurt_old = sum_k u4_k / M2^2 + m4 (1 / M2^2 - 1 / m2^2)``: each fourth-moment term
    contributes ``u4_k / M2^2`` and the second-moment terms together contribute the last part
    (``"u2"``), split between ``u2_1`` and ``u2_2`` in proportion to their sizes. The values are in
    kurtosis units, so they are comparable across layers and runs whatever the activation scale
    (this is our normalisation; the paper's is OPEN, REFERENCE 4), and they sum to the change.
    """
    out: dict[str, list[float]] = {k: [] for k in TERMS}
    for layer in range(len(terms["m2"])):
        m2, m4 = terms["m2"][layer], terms["m4"][layer]
        u21, u22 = terms["u2_1"][layer], terms["u2_2"][layer]
        new_m2 = m2 + u21 + u22
        for k in U4_TERMS:
            out[k].append(terms[k][layer] / new_m2**2)
        second = m4 * (1.0 / new_m2**2 - 1.0 / m2**2)
        total = abs(u21) + abs(u22)
        out["u2_1"].append(second * abs(u21) / total if total else 0.0)
        out["u2_2"].append(second * abs(u22) / total if total else 0.0)
    return out
