"""SmoothQuant (Xiao et al. 2023): activation outliers migrated into the weights, per input channel.

For each linear layer, ``s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)`` over the calibration inputs;
the layer then computes ``(x / s) (W diag(s))^T``: the same function in float, with the input's
outlier channels divided down and the weight's matching columns scaled up. A post-hoc transform
(:data:`ofe.quant.transforms.TRANSFORMS` ``"smoothquant"``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ofe.quant.quantizers import is_linear


class Smoother:
    """SmoothQuant for one linear layer. Until :meth:`fold` its forward pre-hook only records
    ``max|x_j|`` over the inputs it sees; after, it divides the input by ``s`` (before any
    activation quantiser registered later sees it)."""

    def __init__(self, module: nn.Module, alpha: float) -> None:
        self.module, self.alpha = module, alpha
        self.in_axis = 0 if type(module).__name__ == "Conv1D" else 1  # Conv1D stores (in, out)
        self.act_max: Tensor | None = None
        self.scale: Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.scale is not None

    def hook(self, _m: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        if self.scale is None:
            amax = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            self.act_max = amax if self.act_max is None else torch.maximum(self.act_max, amax)
            return None
        return (x / self.scale.to(x.dtype), *args[1:])

    @torch.no_grad()
    def fold(self) -> None:
        """Compute ``s`` from the recorded maxima and scale the weight's input channels by it."""
        w = self.module.weight
        w_max = w.detach().abs().float().amax(dim=1 - self.in_axis)
        act_max = self.act_max if self.act_max is not None else torch.ones_like(w_max)
        scale = act_max.clamp(min=1e-5).pow(self.alpha) / w_max.clamp(min=1e-5).pow(1 - self.alpha)
        scale = torch.where(act_max > 0, scale, torch.ones_like(scale)).clamp(min=1e-5)
        shape = (1, -1) if self.in_axis == 1 else (-1, 1)
        w.mul_(scale.view(shape).to(w.dtype))
        self.scale = scale


@torch.no_grad()
def smooth(model: nn.Module, calib: list[Tensor], alpha: float, keep_float: set[int]) -> dict[str, Smoother]:
    """Smooth every linear layer of ``model`` in place, except those whose weight's id is in
    ``keep_float`` (the LM head): one float pass over the calibration batches (token ids ``(B, T)``)
    records each layer's per-channel input maxima, then the scales are folded into the weights and
    the layers divide their inputs by them from then on. Returns the smoothers by layer name."""
    smoothers = {}
    for name, module in model.named_modules():
        if is_linear(module) and id(module.weight) not in keep_float:
            smoother = smoothers[name] = Smoother(module, alpha)
            module.register_forward_pre_hook(smoother.hook)
    for idx in calib:
        model(idx)
    for smoother in smoothers.values():
        smoother.fold()
    return smoothers
