"""Element-wise kernels of the rotated optimisers, one pass over memory each, compiled with torch.compile.

In eager mode SOAP's element-wise work (the two moments, the Adam direction, the update, the Kronecker
factors' EMAs) is a chain of separate passes over memory, each reading and writing whole tensors, and
with bf16 products a conversion pass for every low-precision operand. On a CPU these passes, not the
arithmetic, cost about as much as the step's matrix products. Compiled, each chain is one loop over the
elements. Each kernel here is written once as plain tensor code (the eager reference, also used where
compilation is unavailable) and compiled once per process for 1-D tensors of any length
(``dynamic=True``): callers pass flattened views, so one graph serves every parameter shape.

Scalars (betas, step sizes) are passed as 0-d tensors so that a changing learning rate does not
trigger a recompilation. If compilation fails (no C++ compiler, an unsupported backend), a warning names
the error once and the eager code runs instead: results are the same up to rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def adam_moments_and_direction(m: Tensor, v: Tensor, g: Tensor, beta1: Tensor, beta2: Tensor, eps: Tensor,
                               out_dtype: torch.dtype) -> Tensor:
    """Update Adam's moments in place from gradient ``g`` (any float dtype; read in ``m``'s) and return
    ``m / (sqrt(v) + eps)`` in ``out_dtype``. All tensors 1-D of one length."""
    g = g.to(m.dtype)
    m.copy_(torch.lerp(m, g, 1.0 - beta1))
    v.copy_(v * beta2 + (1.0 - beta2) * g * g)
    return (m / (v.sqrt() + eps)).to(out_dtype)


def apply_update(p: Tensor, u: Tensor, step_size: Tensor, decay: Tensor) -> None:
    """``p <- (p - step_size * u) * decay`` in place, computed in float32 at least (``u`` may be bf16)."""
    work = torch.promote_types(p.dtype, torch.float32)
    p.copy_(((p.to(work) - step_size * u.to(work)) * decay).to(p.dtype))


def ema(average: Tensor, value: Tensor, weight: Tensor) -> None:
    """``average <- average + weight * (value - average)`` in place; ``value`` may be bf16."""
    average.copy_(torch.lerp(average, value.to(average.dtype), weight))


class Kernel:
    """``fn`` compiled on first use (1-D, dynamic length); eager ``fn`` if compilation is off or fails."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None
        self.failed: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is None:
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(self.fn, dynamic=True)
                return self._compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any compiler failure: run the same code eagerly
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(f"ofe: torch.compile of {self.fn.__name__} failed ({self.failed}); "
                              "running its eager version (same results, slower)", RuntimeWarning, stacklevel=2)
        return self.fn(*args, **kwargs)


KERNELS = {fn.__name__: Kernel(fn) for fn in (adam_moments_and_direction, apply_update, ema)}


def run(name: str, *args: Any, **kwargs: Any) -> Any:
    """Kernel ``name`` on ``args``: compiled, on 1-D views, when every array argument is contiguous and of
    one shape (0-d tensors are scalars); else (a non-contiguous array, or a 0-d parameter such as a
    trainable branch scale, whose state is 0-d too) its eager version on the tensors as they are. A
    returned tensor has the arrays' shape."""
    kernel = KERNELS[name]
    arrays = [a for a in args if isinstance(a, Tensor) and a.dim() > 0]
    if not arrays or not all(a.is_contiguous() and a.shape == arrays[0].shape for a in arrays):
        return kernel.fn(*args, **kwargs)
    out = kernel(*[a.view(-1) if isinstance(a, Tensor) and a.dim() > 0 else a for a in args], **kwargs)
    return out.view(arrays[0].shape) if isinstance(out, Tensor) else out


def scalar(value: float, like: Tensor) -> Tensor:
    """A 0-d tensor on ``like``'s device: float64 beside float64 state, else float32 (a value that
    changes, such as the learning rate, must not recompile the kernel, as a Python float would)."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.tensor(value, dtype=dtype, device=like.device)
