"""A check of the simulator against real int8 kernels.

``ofe`` measures quantisation by simulation (fake quantisation in float). This module runs the same
W8A8 scheme through torchao's int8 linear layers, which on CPU multiply int8 activations by int8
weights into int32 (``torch._int_mm``) and rescale. The scheme both sides use
(:data:`TORCHAO_W8A8`): weights int8 symmetric per output channel (min-max range), activations int8
symmetric per token, computed at run time, at the input of every linear layer but the LM head (float
on both sides), with the symmetric scale ``max|x| / 127.5`` (torchao's convention; ``ofe``'s default
is ``/ 127``).

Two checks, because they answer different questions:

* **per layer** (the rule): every linear layer, fed the same float input, gives the same output
  simulated and real, to :data:`AGREEMENT` of its quantisation error. This is what makes the
  simulator trustworthy: same grids, same rounding, same arithmetic up to float32 summation order.
* **the whole model**: the perplexities. These differ a little more, and for a reason that is not
  a simulator error: real int8 accumulates exactly in int32, the simulator in float32, so the
  inputs of later layers differ in the last bits, which flips the rounding of ~0.1% of the elements
  that sit next to a grid mid-point; the flips compound through the depth. Both results are equally
  valid int8 outcomes; their difference is reported, not judged.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ofe.errors import OfeError
from ofe.monitor.capture import capture
from ofe.quant.simulate import QuantConfig, SimulatedQuantModel, perplexity

# The simulator's settings for the scheme torchao runs.
TORCHAO_W8A8 = QuantConfig(weight_bits=8, act_bits=8, weight_granularity="channel", weight_range="minmax",
                           act_granularity="token", act_scheme="symmetric", symmetric_scale="half-range",
                           sites="linear-inputs")

# Per layer, ||real - simulated|| within this fraction of ||real - float||. Float32 against int32
# summation leaves ~1e-5 of it (measured); a wrong grid, range or granularity leaves ~0.1-1.
AGREEMENT = 1e-3


class Int8Unavailable(OfeError):
    """torchao (the optional ``int8`` extra) is not installed."""


def torchao_int8(model: nn.Module, float_modules: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """A copy of ``model`` whose linear layers (but ``float_modules``) run torchao's int8 dynamic
    activation, int8 weight kernels. The original is untouched."""
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    try:  # torchao reports, on import, the CUDA-only extensions it cannot load on a CPU machine
        for q in quiet:
            q.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        raise Int8Unavailable("the real int8 check needs torchao: pip install 'ofe[int8]' (or torchao)") from None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    real = copy.deepcopy(model).eval()
    quantize_(real, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
              filter_fn=lambda module, name: isinstance(module, nn.Linear) and name not in float_modules)
    return real


@torch.no_grad()
def layer_agreement(model: nn.Module, sim: SimulatedQuantModel, real: nn.Module, idx: Tensor) -> dict[str, float]:
    """Per linear layer of ``sim`` (name -> ``||real - sim|| / ||real - float||``), each fed the float
    model's input of that layer for token ids ``idx`` ``(B, T)``."""
    names = [name for name, _ in sim.quantizers]
    with capture([model.get_submodule(n) for n in names], inputs=True, keep=Tensor.detach) as seen:
        model(idx)
    inputs = dict(zip(names, seen))
    out = {}
    for name in names:
        x = inputs[name]
        f, s, r = model.get_submodule(name)(x), sim.model.get_submodule(name)(x), real.get_submodule(name)(x)
        err = (r - f).float().norm().item()
        out[name] = (r - s).float().norm().item() / err if err > 0 else 0.0
    return out


def crosscheck(model: nn.Module, windows: Tensor, probe_sequences: int = 8) -> dict[str, Any]:
    """The simulated W8A8 (:data:`TORCHAO_W8A8`) against torchao's real int8 model: per-layer
    agreement on the first ``probe_sequences`` of ``windows`` ``(N, T + 1)`` (the rule:
    ``agree``), and the float, simulated and real perplexities on all of them."""
    sim = SimulatedQuantModel(model, TORCHAO_W8A8)
    sim.calibrate([])  # dynamic per-token ranges: nothing to observe, only to switch quantisation on
    real = torchao_int8(model)
    layers = layer_agreement(model, sim, real, windows[:probe_sequences, :-1])
    fp, simulated, real_ppl = perplexity(model, windows), perplexity(sim, windows), perplexity(real, windows)
    worst = max(layers.values(), default=0.0)
    return {"format": TORCHAO_W8A8.label, "scheme": "int8 weights per output channel (min-max), int8 activations "
            "per token (dynamic), symmetric, scale max|x|/127.5, linear-layer inputs, LM head in float",
            "layers": layers, "worst_layer_gap": worst, "tolerance": AGREEMENT, "agree": worst <= AGREEMENT,
            "fp_ppl": fp, "simulated_ppl": simulated, "real_ppl": real_ppl,
            "simulated_increase_pct": 100 * (simulated / fp - 1), "real_increase_pct": 100 * (real_ppl / fp - 1),
            "sequences": len(windows)}
