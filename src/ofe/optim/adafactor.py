"""AdaFactor (Shazeer & Stern, 2018): factored second moments, update clipping, relative steps.

The second-moment rule here (:func:`second_moment`) is shared with the rotated AdaFactor in
:mod:`ofe.optim.rotated`, which applies it in Shampoo's eigenbasis.

How this differs from ``torch.optim.Adafactor``:

* torch's ``lr`` is only a cap: its step is always ``min(lr, 1/sqrt(t)) * max(eps2, RMS(x))``, so a
  learning-rate schedule cannot drive it. Here ``relative_step`` and ``scale_parameter`` are
  switches; with both off (the default) the step is the scheduled ``lr``, as for AdamW.
* torch has no first moment; here ``beta1`` (``momentum=True``) averages the clipped updates, as in
  the paper's algorithm with momentum.
* ``eps1`` is added to the squared gradient (the paper) rather than clamping the estimate at
  ``eps1**2`` (torch); with ``eps1 = 1e-30`` both are no-ops for float32 gradients of normal size.
* ``beta2_decay=None`` gives a constant ``beta2`` with Adam-style bias correction.

With ``momentum=False, relative_step=True, scale_parameter=True`` and matching ``eps1``/``eps2``/
``d``/``beta2_decay`` the two coincide (tested), except on entries whose gradient has always been
exactly zero (e.g. unused position embeddings): torch computes ``0 * rsqrt(0)`` = NaN there, this
implementation leaves them unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def beta2_at(t: int, beta2: float, beta2_decay: float | None) -> float:
    """AdaFactor's ``beta2_t = 1 - t**decay`` (decay < 0), or a constant ``beta2``."""
    return 1.0 - t**beta2_decay if beta2_decay is not None else beta2


def state_dtype(p: Tensor) -> torch.dtype:
    """Optimiser state precision: float32, or float64 for float64 parameters ("float32 or better")."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def init_second_moment(state: dict[str, Any], shape: torch.Size, device: torch.device, dtype: torch.dtype) -> None:
    """Factored row/column statistics for matrices, a full vector otherwise."""
    if len(shape) >= 2:
        state["row"] = torch.zeros(*shape[:-1], 1, device=device, dtype=dtype)
        state["col"] = torch.zeros(*shape[:-2], 1, shape[-1], device=device, dtype=dtype)
    else:
        state["v"] = torch.zeros(shape, device=device, dtype=dtype)


def second_moment(state: dict[str, Any], g: Tensor, beta2_t: float, eps1: float) -> Tensor:
    """Update the EMA of ``g**2 + eps1`` and return the (factored) estimate ``v_hat`` shaped like ``g``."""
    g2 = g.square().add_(eps1)
    if "row" in state:
        state["row"].lerp_(g2.mean(-1, keepdim=True), 1.0 - beta2_t)
        state["col"].lerp_(g2.mean(-2, keepdim=True), 1.0 - beta2_t)
        return (state["row"] @ state["col"]).div_(state["row"].mean(-2, keepdim=True))
    state["v"].lerp_(g2, 1.0 - beta2_t)
    return state["v"].clone()


def reorder_second_moment(state: dict[str, Any], dim: int, index: Tensor) -> None:
    """Permute the statistics along ``dim`` (0: rows, 1: columns) to follow a re-sorted basis."""
    if "row" in state:
        key = "row" if dim == 0 else "col"
        state[key] = state[key].index_select(dim, index)
    else:
        state["v"] = state["v"].index_select(dim, index)


def clip_update(u: Tensor, d: float) -> Tensor:
    """Scale ``u`` down so that RMS(u) <= d (no host sync); d = 0 disables."""
    if d <= 0:
        return u
    rms = u.norm() / math.sqrt(u.numel())
    return u / torch.clamp(rms / d, min=1.0)


class Adafactor(torch.optim.Optimizer):
    """AdaFactor with optional momentum, factored second moments and update clipping.

    Args:
        lr: step size (with ``relative_step``: the cap of ``min(lr, 1/sqrt(t))``).
        beta1: first-moment decay, used when ``momentum``.
        beta2: constant second-moment decay, used when ``beta2_decay`` is None.
        beta2_decay: ``beta2_t = 1 - t**beta2_decay`` (the paper's -0.8).
        eps1: added to squared gradients. eps2: floor of the parameter scale.
        d: update clipping threshold (RMS); 0 disables.
        weight_decay: decoupled, ``x *= 1 - lr * weight_decay``.
    """

    def __init__(self, params, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                 beta2_decay: float | None = -0.8, eps1: float = 1e-30, eps2: float = 1e-3, d: float = 1.0,
                 weight_decay: float = 0.0, momentum: bool = True, relative_step: bool = False,
                 scale_parameter: bool = False, bias_correction: bool = True) -> None:
        defaults = dict(lr=lr, beta1=beta1, beta2=beta2, beta2_decay=beta2_decay, eps1=eps1, eps2=eps2, d=d,
                        weight_decay=weight_decay, momentum=momentum, relative_step=relative_step,
                        scale_parameter=scale_parameter, bias_correction=bias_correction, step=0)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["step"] += 1
            t = group["step"]
            beta2_t = beta2_at(t, group["beta2"], group["beta2_decay"])
            rho = min(group["lr"], 1.0 / math.sqrt(t)) if group["relative_step"] else group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.to(state_dtype(p))
                state = self.state[p]
                if not state:
                    init_second_moment(state, g.shape, g.device, g.dtype)
                    if group["momentum"]:
                        state["m"] = torch.zeros_like(g)
                v_hat = second_moment(state, g, beta2_t, group["eps1"])
                if group["beta2_decay"] is None and group["bias_correction"]:
                    v_hat.div_(1.0 - group["beta2"] ** t)
                u = clip_update(g / v_hat.sqrt(), group["d"])
                if group["momentum"]:
                    state["m"].lerp_(u, 1.0 - group["beta1"])
                    u = state["m"] / (1.0 - group["beta1"] ** t) if group["bias_correction"] else state["m"]
                alpha = rho
                if group["scale_parameter"]:  # a tensor: no host sync
                    alpha = rho * torch.clamp(p.float().norm() / math.sqrt(p.numel()), min=group["eps2"])
                if group["weight_decay"]:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.sub_((alpha * u).to(p.dtype))
        return loss
