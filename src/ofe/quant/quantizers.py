"""Fake (simulated) quantisers: integer affine grids, FP8 E4M3, weight ranges, activation observers.

All functions return float tensors holding the de-quantised values, so a model runs unchanged on
them (simulated quantisation). Rounding is round-half-to-even on ``x * (1 / scale)``, exactly as
``torch.fake_quantize_per_tensor_affine``.
"""

from __future__ import annotations

import torch
from torch import Tensor

FP8_E4M3_MAX = 448.0


def int_grid(bits: int, signed: bool) -> tuple[int, int]:
    """``(qmin, qmax)``: signed ``[-2^(b-1), 2^(b-1) - 1]``, unsigned ``[0, 2^b - 1]``."""
    if bits < 2:
        raise ValueError(f"need at least 2 bits, got {bits}")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def fake_quant(x: Tensor, scale: Tensor | float, zero_point: Tensor | float, qmin: int, qmax: int) -> Tensor:
    """``(clamp(round(x / scale) + z, qmin, qmax) - z) * scale``; ``scale``/``z`` broadcast (per channel).

    ``1 / scale`` is taken in float32, as torch does, so grid half-points round identically."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    q = torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def fast_fake_quant(x: Tensor, scale: Tensor | float, zero_point: Tensor | float, qmin: int, qmax: int) -> Tensor:
    """:func:`fake_quant` computed in place on one new buffer: the same operations in the same order
    (identical results, tested), about 3x faster on CPU than the out-of-place form, and faster than
    torch's fused ``fake_quantize_per_tensor_affine`` kernel, which also builds a gradient mask."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    y = x.float() * (1.0 / scale)
    return y.round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


def symmetric_scale(max_abs: Tensor, bits: int, half_range: bool = False) -> Tensor:
    """Scale of a symmetric signed grid covering ``[-max_abs, max_abs]`` (zero point 0):
    ``max_abs / qmax`` (127 at 8 bits), or with ``half_range`` ``max_abs / ((qmax - qmin) / 2)``
    (127.5: the convention of PyTorch's and torchao's symmetric observers)."""
    qmin, qmax = int_grid(bits, signed=True)
    divisor = (qmax - qmin) / 2 if half_range else qmax
    return torch.clamp(max_abs / divisor, min=torch.finfo(torch.float32).tiny)  # a zero range: 0 stays 0, no NaN


def quantize_weight(w: Tensor, bits: int, per_channel: bool = False, method: str = "minmax", grid: int = 100,
                    half_range: bool = False) -> Tensor:
    """Symmetric signed fake quantisation of a weight matrix ``(out, in)``.

    ``method``: ``minmax`` (range = max |w|) or ``mse`` (the clipping range among ``grid`` candidates
    ``max|w| * i / grid`` that minimises the squared error). ``per_channel``: one range per output row.
    ``half_range``: see :func:`symmetric_scale`.
    """
    qmin, qmax = int_grid(bits, signed=True)
    w = w.float()
    dims = tuple(range(1, w.dim())) if per_channel else tuple(range(w.dim()))
    max_abs = w.abs().amax(dim=dims, keepdim=True)
    if method == "minmax":
        return fake_quant(w, symmetric_scale(max_abs, bits, half_range), 0.0, qmin, qmax)
    if method != "mse":
        raise ValueError(f"unknown weight range method {method!r}")
    best, best_err = None, None
    for i in range(1, grid + 1):
        candidate = fast_fake_quant(w, symmetric_scale(max_abs * (i / grid), bits, half_range), 0.0, qmin, qmax)
        err = (candidate - w).square().sum(dim=dims, keepdim=True)
        if best is None:
            best, best_err = candidate, err
        else:
            better = err < best_err
            best = torch.where(better, candidate, best)
            best_err = torch.where(better, err, best_err)
    return best


def asymmetric_qparams(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``(scale, zero_point)`` of an unsigned grid covering ``[min(lo, 0), max(hi, 0)]``; the zero
    point is rounded, so 0.0 is represented exactly."""
    qmin, qmax = int_grid(bits, signed=False)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=torch.finfo(torch.float32).tiny)
    zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point


def fake_fp8(x: Tensor, amax: Tensor | float) -> Tensor:
    """FP8 E4M3 simulation with a per-tensor scale mapping ``amax`` to the format's max (448)."""
    scale = torch.clamp(torch.as_tensor(amax, dtype=torch.float32, device=x.device), min=1e-30) / FP8_E4M3_MAX
    y = torch.clamp(x.float() / scale, -FP8_E4M3_MAX, FP8_E4M3_MAX)
    return y.to(torch.float8_e4m3fn).float() * scale


class RangeObserver:
    """Running activation range: the first batch initialises, then ``new = m * old + (1 - m) * batch``.

    ``percentile`` (e.g. 99.99) replaces each batch's min/max by that percentile of the values
    (estimated on at most 2^20 evenly spaced elements), for a range that ignores rare extremes.
    """

    def __init__(self, momentum: float = 0.9, percentile: float | None = None) -> None:
        self.momentum, self.percentile = momentum, percentile
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None

    def update(self, x: Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if self.percentile is None:
            lo, hi = x.amin(), x.amax()
        else:
            if x.numel() > 1 << 20:
                x = x[torch.linspace(0, x.numel() - 1, 1 << 20, device=x.device).long()]
            q = torch.tensor([1 - self.percentile / 100, self.percentile / 100], device=x.device)
            lo, hi = torch.quantile(x, q)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.momentum * self.lo + (1 - self.momentum) * lo
            self.hi = self.momentum * self.hi + (1 - self.momentum) * hi

    @property
    def ready(self) -> bool:
        return self.lo is not None
