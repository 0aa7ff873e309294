"""Simulated post-training quantisation of an ``ofe`` GPT: the paper's W8A8 protocol and variants.

Protocol (REFERENCE 5, the paper's OPT-125m table): weights of every linear layer but the LM head,
8-bit symmetric per tensor (range by MSE grid search); activations 8-bit asymmetric per tensor with
static ranges from a running min-max (momentum 0.9) over a few calibration batches of the training
split, then frozen; quantised at the outputs of the embedding sum, every norm, q/k/v and the
attention output projection, attention scores and probabilities, the attention context, the MLP
hidden activation and output, both residual sums and the final norm (every :meth:`GPT.taps` site);
the LM head and everything inside softmax/norm/nonlinearities stay in float.

Variants: bit widths, per-channel weights, min-max weight ranges, percentile activation ranges,
FP8 (E4M3) weights and activations, weight-only quantisation (``act_bits = 0``), quantising only
the inputs of linear layers (``sites = "linear-inputs"``), and post-hoc transforms applied first
(``transforms``: SmoothQuant, Hadamard rotation, per-token ranges; :mod:`ofe.quant.transforms`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ofe.config import ConfigError, field
from ofe.models import lm_loss
from ofe.monitor.capture import capture
from ofe.quant.quantizers import (
    RangeObserver,
    asymmetric_qparams,
    fake_fp8,
    fast_fake_quant,
    int_grid,
    is_linear,
    quantize_weight,
    symmetric_scale,
)
from ofe.quant.transforms import TRANSFORMS, TransformContext


@dataclass(frozen=True)
class QuantConfig:
    weight_bits: int = field(8, "weight bits (0: float weights)")
    weight_format: Literal["int", "fp8"] = field("int", "weight number format")
    weight_granularity: Literal["tensor", "channel"] = field("tensor", "one range per tensor or per output channel")
    weight_range: Literal["mse", "minmax"] = field("mse", "weight range: MSE grid search over 100 clipping ranges, or min-max")
    act_bits: int = field(8, "activation bits (0: float activations)")
    act_format: Literal["int", "fp8"] = field("int", "activation number format")
    act_scheme: Literal["asymmetric", "symmetric"] = field(
        "asymmetric", "integer activation grid: asymmetric (unsigned, with a zero point: the paper's protocol) or "
                      "symmetric (signed, zero point 0: what int8 GEMM kernels such as torchao's take)")
    symmetric_scale: Literal["qmax", "half-range"] = field(
        "qmax", "scale of the symmetric int grids (weights; activations with act_scheme = symmetric): max|x| / qmax "
                "(127 at 8 bits) or max|x| / ((qmax - qmin) / 2) (127.5: PyTorch's and torchao's convention)")
    act_range: Literal["minmax", "percentile"] = field("minmax", "per-batch activation range statistic")
    act_granularity: Literal["tensor", "token"] = field(
        "tensor", "tensor: one static range per site from calibration (the paper's protocol); token: a dynamic "
                  "min-max range per token (row of the last dimension) at run time, as deployments do")
    act_percentile: float = field(99.99, "percentile for act_range = percentile")
    momentum: float = field(0.9, "running range: new = momentum * old + (1 - momentum) * batch")
    sites: Literal["all", "linear-inputs"] = field("all", "quantised activations: the protocol's full list, or only linear-layer inputs")
    transforms: tuple[str, ...] = field((), "comma-separated post-hoc transforms applied in this order before "
                                            f"quantising ({', '.join(TRANSFORMS)}; see ofe.quant.transforms)")
    smooth_alpha: float = field(0.5, "SmoothQuant's migration strength alpha in (0, 1] (read by the smoothquant "
                                     "transform)")
    calib_batches: int = field(4, "calibration batches from the training split")
    calib_batch_size: int = field(8, "sequences per calibration batch")
    seed: int = field(1234, "seed of the calibration batches")

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits"):
            bits = getattr(self, name)
            if bits != 0 and not 2 <= bits <= 16:
                raise ConfigError(f"quant.{name} must be 0 (float) or 2..16, got {bits}")
        if self.calib_batches <= 0 or self.calib_batch_size <= 0:
            raise ConfigError("quant.calib_batches and quant.calib_batch_size must be positive")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"quant.momentum must be in [0, 1), got {self.momentum}")
        if not 50.0 < self.act_percentile <= 100.0:
            raise ConfigError(f"quant.act_percentile must be in (50, 100], got {self.act_percentile}")
        if not 0.0 < self.smooth_alpha <= 1.0:
            raise ConfigError(f"quant.smooth_alpha must be in (0, 1], got {self.smooth_alpha}")
        if len(set(self.transforms)) != len(self.transforms):
            raise ConfigError(f"quant.transforms lists a transform twice: {', '.join(self.transforms)}")
        for name in self.transforms:
            self._apply_transform(name)

    def _apply_transform(self, name: str) -> None:
        """Check that transform ``name`` exists and fits these settings; set the options it implies."""
        transform = TRANSFORMS.get(name)
        if transform is None:
            raise ConfigError(f"config key 'quant.transforms': unknown transform {name!r} (known: {', '.join(TRANSFORMS)})")
        if transform.linear_inputs and self.sites != "linear-inputs":
            raise ConfigError(f"quant.transforms {name} needs quant.sites = linear-inputs: it acts on the inputs of "
                              "linear layers")
        before = self.transforms[: self.transforms.index(name)]
        if transform.needs_plain_model and any(TRANSFORMS[b].prepare is not None for b in before):  # checked in order
            raise ConfigError(f"quant.transforms: {name} must come before {', '.join(before)}: it rewrites the weights "
                              "of a plain model")
        for key, value in transform.settings.items():
            default = next(f.default for f in dataclasses.fields(self) if f.name == key)
            if getattr(self, key) not in (default, value):
                raise ConfigError(f"quant.transforms {name} sets quant.{key} = {value}, but {getattr(self, key)} was given")
            object.__setattr__(self, key, value)

    @property
    def label(self) -> str:
        """``W8A8``, ``WFP8AFP8``, ``W4A16``...; ``-token`` marks per-token dynamic activations, then each
        transform its own suffix (``-smooth0.5``, ``-rot``) in the order they apply."""
        w = "W" + ("16" if self.weight_bits == 0 else f"{self.weight_bits}" if self.weight_format == "int" else "FP8")
        a = "A" + ("16" if self.act_bits == 0 else f"{self.act_bits}" if self.act_format == "int" else "FP8")
        sym = "-sym" if self.act_bits and self.act_format == "int" and self.act_scheme == "symmetric" else ""
        steps = "".join(TRANSFORMS[name].label(self) for name in self.transforms)
        return w + a + ("-token" if self.act_bits and self.act_granularity == "token" else "") + sym + steps

class ActQuantizer:
    """One activation site: observes its range while calibrating, fake-quantises once frozen (per
    token, dynamically, when ``act_granularity`` is ``token``: calibration is then not needed)."""

    def __init__(self, cfg: QuantConfig) -> None:
        self.cfg = cfg
        self.observer = RangeObserver(cfg.momentum, cfg.act_percentile if cfg.act_range == "percentile" else None)
        self.frozen = False

    def __call__(self, x: Tensor) -> Tensor | None:
        if self.cfg.act_granularity == "token":
            return _per_token_quant(x, self.cfg) if self.frozen else None
        if not self.frozen:
            self.observer.update(x)
            return None
        if not self.observer.ready:  # never seen in calibration: leave it in float
            return None
        return _fake_quant_range(x, self.observer.lo, self.observer.hi, self.cfg)


# The protocol's activation sites (GPT.taps) in families, to tell where a format's error comes from.
SITE_FAMILIES: dict[str, tuple[str, ...]] = {
    "residual": ("emb", "resid_mid", "resid"),
    "norm outputs": ("norm1_out", "norm2_out", "final_norm_out"),
    "attention": ("q", "k", "v", "attn_scores", "attn_probs", "attn_context", "attn_out"),
    "mlp": ("mlp_hidden", "mlp_out"),
}


def _fake_quant_range(x: Tensor, lo: Tensor, hi: Tensor, cfg: QuantConfig) -> Tensor:
    """Fake-quantise ``x`` on the activation grid covering ``[lo, hi]`` (broadcast: one range per
    tensor or per row): int of ``act_bits`` (asymmetric, or symmetric over ``max(|lo|, |hi|)``), or
    FP8 scaled to ``max(|lo|, |hi|)``."""
    if cfg.act_format == "fp8":
        return fake_fp8(x, torch.maximum(lo.abs(), hi.abs())).to(x.dtype)
    if cfg.act_scheme == "symmetric":
        qmin, qmax = int_grid(cfg.act_bits, signed=True)
        scale = symmetric_scale(torch.maximum(lo.abs(), hi.abs()), cfg.act_bits, cfg.symmetric_scale == "half-range")
        return fast_fake_quant(x, scale, 0.0, qmin, qmax).to(x.dtype)
    scale, zero_point = asymmetric_qparams(lo, hi, cfg.act_bits)
    qmin, qmax = int_grid(cfg.act_bits, signed=False)
    return fast_fake_quant(x, scale, zero_point, qmin, qmax).to(x.dtype)


def _per_token_quant(x: Tensor, cfg: QuantConfig) -> Tensor:
    """Fake-quantise each row of the last dimension with its own min-max range."""
    xf = x.float()
    return _fake_quant_range(xf, xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True), cfg).to(x.dtype)


def _quantize_weights(model: nn.Module, cfg: QuantConfig, skip: set[int]) -> int:
    """Fake-quantise every linear weight except those in ``skip`` (ids of tensors), in place."""
    count = 0
    for module in model.modules():
        if not is_linear(module) or id(module.weight) in skip:
            continue
        w = module.weight
        if cfg.weight_format == "fp8":
            dims = tuple(range(1, w.dim())) if cfg.weight_granularity == "channel" else tuple(range(w.dim()))
            q = fake_fp8(w.detach().float(), w.detach().abs().amax(dim=dims, keepdim=True))
        else:
            q = quantize_weight(w.detach(), cfg.weight_bits, cfg.weight_granularity == "channel", cfg.weight_range,
                                half_range=cfg.symmetric_scale == "half-range")
        with torch.no_grad():
            w.copy_(q.to(w.dtype))
        count += 1
    return count


class SimulatedQuantModel:
    """A quantised copy of a model. Calibrate with :meth:`calibrate`, then call it like the model.

    The float model is left untouched. The copy is first prepared by the config's post-hoc
    transforms (``quant.transforms``, :data:`ofe.quant.transforms.TRANSFORMS`, in order; those that
    read calibration data run in :meth:`calibrate`), then its weights are quantised and its
    activation quantisers attached. With ``sites = "all"`` (``ofe`` models) every activation site
    of :meth:`GPT.taps` is quantised (attention then runs through an explicit softmax so scores and
    probabilities can be quantised); ``"linear-inputs"`` quantises the input of every linear layer
    (any model), plus the outputs of the modules named in ``output_modules`` (e.g. the blocks of a
    Hugging Face model, whose outputs are the residual stream). Weights of the modules named in
    ``float_modules`` (and any linear sharing their weight) stay in float: the LM head.
    """

    def __init__(self, model: nn.Module, cfg: QuantConfig, float_modules: tuple[str, ...] = ("lm_head",),
                 output_modules: tuple[str, ...] = (), only_sites: tuple[str, ...] | None = None,
                 inplace: bool = False) -> None:
        """``only_sites``: with ``sites = "all"``, quantise only the activations at these
        :meth:`GPT.taps` sites (e.g. one of :data:`SITE_FAMILIES`); None: every site. A transform
        that does not apply to ``model`` raises its error here. ``inplace``: quantise ``model`` itself
        instead of a copy (no second set of weights in memory; the float model is gone afterwards)."""
        self.cfg = cfg
        self.only_sites = only_sites
        self.float_modules, self.output_modules = tuple(n for n in float_modules if n), output_modules
        named = dict(model.named_modules())
        unknown = [n for n in (*self.float_modules, *output_modules) if n not in named]
        if unknown:
            raise ValueError(f"no module named {unknown[0]!r} in {type(model).__name__}")
        self.pending = [TRANSFORMS[name] for name in cfg.transforms]
        for transform in self.pending:
            if transform.check is not None:
                transform.check(model)
        self.model = (model if inplace else copy.deepcopy(model)).eval()
        self.notes: dict[str, object] = {}  # what the transforms computed, by name (e.g. SmoothQuant's scales)
        self.n_weights = 0
        self.quantizers: dict[tuple[str, int], ActQuantizer] = {}
        if not any(t.needs_calibration for t in self.pending):
            self._prepare([])

    @property
    def smoothed(self) -> dict:
        """SmoothQuant's smoother per layer name (empty without the smoothquant transform)."""
        return self.notes.get("smoothquant", {})

    def _keep_float(self) -> set[int]:
        named = dict(self.model.named_modules())
        return {id(getattr(named[n], "weight", None)) for n in self.float_modules}

    @torch.no_grad()
    def _prepare(self, calib: list[Tensor]) -> None:
        """Run the pending transforms, quantise the weights and attach the activation quantisers."""
        for transform in self.pending:
            if transform.prepare is not None:
                ctx = TransformContext(self.cfg, frozenset(self._keep_float()), self.notes)
                self.model = transform.prepare(self.model, calib, ctx)
        self.pending = []
        skip = self._keep_float()
        self.n_weights = _quantize_weights(self.model, self.cfg, skip) if self.cfg.weight_bits else 0
        if self.cfg.act_bits:
            named = dict(self.model.named_modules())
            self._attach(skip, [named[n] for n in self.output_modules])

    def _attach(self, skip: set[int], outputs: list[nn.Module]) -> None:
        def output_hook(q: ActQuantizer):
            def hook(_m, _i, out):
                if isinstance(out, tuple):  # HF blocks may return (hidden_states, ...)
                    new = q(out[0])
                    return None if new is None else (new, *out[1:])
                return q(out)
            return hook

        def input_hook(q: ActQuantizer):
            def hook(_m, args):
                out = q(args[0])
                return None if out is None else (out, *args[1:])
            return hook

        if self.cfg.sites == "all":
            if not hasattr(self.model, "taps"):
                raise ValueError("quant sites 'all' needs an ofe GPT (its taps); use sites 'linear-inputs'")
            for site, layers in self.model.taps().items():
                if self.only_sites is not None and site not in self.only_sites:
                    continue
                for layer, tap in layers.items():
                    q = self.quantizers[(site, layer)] = ActQuantizer(self.cfg)
                    tap.register_forward_hook(output_hook(q))
                    tap.enabled = True
                    tap.transform = True
            return
        for name, module in self.model.named_modules():
            if is_linear(module) and id(module.weight) not in skip:
                q = self.quantizers[(name, 0)] = ActQuantizer(self.cfg)
                module.register_forward_pre_hook(input_hook(q))
        for layer, module in enumerate(outputs):
            q = self.quantizers[("output", layer)] = ActQuantizer(self.cfg)
            module.register_forward_hook(output_hook(q))

    @torch.no_grad()
    def calibrate(self, batches: list[Tensor]) -> None:
        """Transforms that read calibration data first (e.g. SmoothQuant's pass over ``batches``),
        then running-range estimation over ``batches`` (token ids ``(B, T)``) in float, then freeze."""
        if self.pending:
            self._prepare(batches)
        for q in self.quantizers.values():
            q.frozen = False
        for idx in batches:
            self.model(idx)
        for q in self.quantizers.values():
            q.frozen = True

    @torch.no_grad()
    def __call__(self, idx: Tensor) -> Tensor:
        if self.pending:
            raise RuntimeError("calibrate the quantised model first: a transform needs calibration data")
        return self.model(idx)


def output_logits(output: Any) -> Tensor:
    """The ``(B, T, V)`` logits of a model's output: an ``ofe`` GPT returns them, a Hugging Face causal
    LM returns an output object holding them."""
    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor):
        raise TypeError(f"the model returned {type(output).__name__}, which holds no logits tensor")
    return logits


@torch.no_grad()
def perplexity(model, windows: Tensor, batch_size: int = 16) -> float:
    """``exp`` of the mean next-token cross-entropy over ``windows`` ``(N, T + 1)`` (an ``ofe`` GPT or a
    Hugging Face causal LM)."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        total += lm_loss(output_logits(model(chunk[:, :-1])), chunk[:, 1:]).item() * len(chunk)
        count += len(chunk)
    return math.exp(total / count)


@torch.no_grad()
def block_outputs(model: nn.Module, blocks: nn.ModuleList, idx: Tensor) -> list[Tensor]:
    """The residual stream leaving each block for input ``idx``."""
    with capture(list(blocks)) as outs:
        model(idx)
    return outs


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantisation-noise ratio ``10 log10(||x||^2 / ||x - q||^2)`` in dB (inf if exact)."""
    noise = (reference - approx).square().sum().item()
    signal = reference.square().sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)
