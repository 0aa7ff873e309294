"""`OutlierMonitor`: collect outlier-feature metrics from a model at chosen sites, cheaply.

The monitor attaches forward hooks once and is only active on the steps it is due
(``step % every == 0``). While inactive an ``ofe`` model's taps are disabled, so the forward pass
runs as if no monitor existed. While active each hook computes its metrics on the spot (the
activation is not kept) and keeps the small result tensors on the device; :meth:`collect` moves
them all to the host in one transfer.

Three kinds of model are supported:

* an ``ofe`` :class:`~ofe.models.GPT`: any site of ``GPT.taps()`` (``resid``, ``attn_out``,
  ``mlp_hidden``, ``attn_probs``, ...) at every layer, through the model's taps;
* any ``nn.Module`` given module names or a regular expression over ``named_modules()``: their
  outputs (first element of a tuple) are observed as site ``output``;
* a Hugging Face model (anything with a stack of identical blocks in an ``nn.ModuleList``): the
  hidden state leaving each block (before any final norm) as site ``resid``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ofe import metrics as M

ActivationMetric = Callable[[Tensor], Tensor]

ACTIVATION_METRICS: dict[str, ActivationMetric] = {
    "kurtosis": M.kurtosis,
    "kurtosis_centered": lambda x: M.kurtosis(x, center=True),
    "mmr": M.max_median_ratio,
    "input_correlation": M.input_correlation,
    "max_abs": M.max_abs,
    "seq_max_abs": M.sequence_max_abs,
    "seq_kurtosis": M.sequence_kurtosis,
    "int8_outlier_dims": M.int8_token_frac,  # per-layer token fractions, combined by collect()
}
PROBS_METRICS: dict[str, Callable[[Tensor], Tensor]] = {"attention_entropy": M.attention_entropy}
DEFAULT_METRICS = ("kurtosis", "mmr", "input_correlation", "max_abs", "attention_entropy")
ALL_METRICS = tuple(ACTIVATION_METRICS) + tuple(PROBS_METRICS)
OFE_SITES = ("resid", "attn_out", "mlp_hidden", "attn_probs")  # the common ones; any of GPT.taps() works
# Metrics that need a (..., T, d) tensor with T >= 2: skipped for 2-D outputs.
_SEQUENCE_METRICS = {"input_correlation", "seq_max_abs", "seq_kurtosis"}

Results = dict[str, dict[str, Any]]


def find_block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest ``nn.ModuleList`` of same-class modules: the block stack of a transformer."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ValueError(f"no stack of blocks (nn.ModuleList) found in {type(model).__name__}; pass modules= or pattern=")
    return best


class OutlierMonitor:
    """Per-site, per-layer outlier metrics of a model, every ``every`` steps.

    Args:
        model: an ``ofe`` GPT, a Hugging Face model, or any ``nn.Module`` (with ``modules`` or
            ``pattern``).
        every: the monitor is due on steps where ``step % every == 0``.
        metrics: names from :data:`ALL_METRICS` (``"all"`` for every one); each applies to the
            sites it makes sense for (``attention_entropy`` to ``attn_probs``, the rest to
            activations).
        sites: ``ofe`` models only: which sites of ``GPT.taps()`` to observe (default ``resid`` and
            ``attn_probs``; :data:`OFE_SITES` lists the usual ones).
        modules: explicit module names to observe (their outputs), in layer order.
        pattern: regular expression matched (fully) against ``named_modules()`` names.
        max_tokens: bound on tokens per sequence used by ``input_correlation`` (None: all).
        mmr_max_rows: bound on the inputs (tokens) ``mmr`` averages over, evenly spaced; its
            per-token median is the one super-linear cost (None: all tokens, exact).
        probs_max_batch: ``ofe`` models: attention probabilities are materialised (SDPA never
            forms them) for the first this-many sequences of the batch only (None: all, exact).

    Use::

        monitor = OutlierMonitor(model, every=10)
        for step in range(steps):
            with monitor.observe(step):
                loss = loss_fn(model(x), y)
            loss.backward(); opt.step()
            stats = monitor.collect()  # None unless the step was due
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 1,
        metrics: Sequence[str] | str = DEFAULT_METRICS,
        sites: Sequence[str] = ("resid", "attn_probs"),
        modules: Sequence[str] | None = None,
        pattern: str | None = None,
        max_tokens: int | None = None,
        mmr_max_rows: int | None = 256,
        probs_max_batch: int | None = 2,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        names = ALL_METRICS if metrics == "all" else tuple(metrics)
        unknown = [m for m in names if m not in ALL_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(ALL_METRICS)}")
        self._model = model
        self.every = every
        self.metrics = names
        self.max_tokens = max_tokens
        self.mmr_max_rows = mmr_max_rows
        self.probs_max_batch = probs_max_batch
        self._active = False
        self._pending: list[tuple[str, int, str, Tensor]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._taps: list[nn.Module] = []
        self._attach(model, sites, modules, pattern)

    # ---- wiring ------------------------------------------------------------------------------
    def _attach(self, model: nn.Module, sites: Sequence[str], modules: Sequence[str] | None, pattern: str | None) -> None:
        if modules is not None or pattern is not None:
            named = dict(model.named_modules())
            if modules is not None:
                missing = [m for m in modules if m not in named]
                if missing:
                    raise ValueError(f"no module named {missing[0]!r} in {type(model).__name__}")
                chosen = list(modules)
            else:
                chosen = [n for n in named if n and re.fullmatch(pattern, n)]  # type: ignore[arg-type]
                if not chosen:
                    raise ValueError(f"pattern {pattern!r} matches no module of {type(model).__name__}")
            for layer, name in enumerate(chosen):
                self._hook(named[name], "output", layer)
        elif hasattr(model, "taps"):
            available = model.taps()
            bad = [s for s in sites if s not in available]
            if bad:
                raise ValueError(f"unknown site(s) {bad}; known: {', '.join(available)}")
            for site in sites:
                for layer, tap in available[site].items():
                    self._hook(tap, site, layer)
                    self._taps.append(tap)
                    if site == "attn_probs":
                        tap.max_batch = self.probs_max_batch
        else:
            _, stack = find_block_stack(model)
            for layer, block in enumerate(stack):
                self._hook(block, "resid", layer)

    def _hook(self, module: nn.Module, site: str, layer: int) -> None:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if self._active:
                tensor = output[0] if isinstance(output, (tuple, list)) else output
                self._record(site, layer, tensor)

        self._handles.append(module.register_forward_hook(hook))

    @torch.compiler.disable
    @torch.no_grad()
    def _record(self, site: str, layer: int, x: Tensor) -> None:
        """Compute this site's metrics for one layer now; keep only the (tiny) results."""
        x = x.detach()
        if site == "attn_probs":
            for name in self.metrics:
                if name in PROBS_METRICS:
                    self._pending.append((site, layer, name, PROBS_METRICS[name](x)))
            return
        for name in self.metrics:
            if name not in ACTIVATION_METRICS or (name in _SEQUENCE_METRICS and x.dim() < 3):
                continue
            if name == "input_correlation":
                value = M.input_correlation(x, max_tokens=self.max_tokens)
            elif name == "mmr":
                value = M.max_median_ratio(x, max_rows=self.mmr_max_rows)
            else:
                value = ACTIVATION_METRICS[name](x)
            self._pending.append((site, layer, name, value))

    # ---- stepping ----------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return step % self.every == 0

    def _set_active(self, active: bool) -> None:
        self._active = active
        for tap in self._taps:
            tap.enabled = active

    @contextlib.contextmanager
    def observe(self, step: int | None = None) -> Iterator[bool]:
        """Activate the hooks for the forward pass(es) inside the block if ``step`` is due
        (always when ``step`` is None). Yields whether it is active."""
        active = step is None or self.due(step)
        if not active:
            yield False
            return
        self._set_active(True)
        try:
            yield True
        finally:
            self._set_active(False)

    def collect(self, reduce: Callable[[Tensor], Tensor] | None = None) -> Results | None:
        """Results recorded since the last call, or None if nothing was recorded.

        Returns ``{site: {metric: [value per layer]}}`` where a value is a float
        (``attention_entropy``: a list of per-head floats), plus ``int8_outlier_dims`` as one
        int per site. Layers observed several times (gradient accumulation) are averaged.
        One device-to-host transfer. ``reduce`` (e.g. a mean over data-parallel ranks) is applied
        to the flat tensor of every value first; all ranks must have observed the same sites.
        """
        if not self._pending:
            return None
        pending, self._pending = self._pending, []
        flat_tensor = torch.cat([v.reshape(-1).float() for *_, v in pending])
        flat = (reduce(flat_tensor) if reduce else flat_tensor).cpu().tolist()
        grouped: dict[tuple[str, str], dict[int, list[list[float]]]] = {}
        offset = 0
        for site, layer, name, value in pending:
            n = value.numel()
            grouped.setdefault((site, name), {}).setdefault(layer, []).append(flat[offset : offset + n])
            offset += n
        results: Results = {}
        for (site, name), by_layer in grouped.items():
            per_layer = [_mean_rows(by_layer[layer]) for layer in sorted(by_layer)]
            if name == "int8_outlier_dims":
                token_frac = torch.tensor(per_layer)  # (L, d)
                results.setdefault(site, {})[name] = int(M.outlier_dims_from_token_frac(token_frac).sum())
            elif name == "attention_entropy":
                results.setdefault(site, {})[name] = per_layer
            else:
                results.setdefault(site, {})[name] = [v[0] for v in per_layer]
        return results

    def measure(self, *args: Any, **kwargs: Any) -> Results:
        """Run ``model(*args, **kwargs)`` once without gradients, observed, and return the results."""
        with torch.no_grad(), self.observe():
            self._model(*args, **kwargs)
        return self.collect() or {}

    def close(self) -> None:
        """Remove every hook; the model is left as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._set_active(False)
        for tap in self._taps:
            tap.max_batch = None

    def __enter__(self) -> OutlierMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mean_rows(rows: list[list[float]]) -> list[float]:
    return [sum(col) / len(rows) for col in zip(*rows)]


def flatten_results(results: Results) -> dict[str, float]:
    """``{"site/metric/layer": value}`` scalars for loggers; entropy as ``.../layer/head``."""
    flat: dict[str, float] = {}
    for site, by_metric in results.items():
        for name, values in by_metric.items():
            if isinstance(values, (int, float)):
                flat[f"{site}/{name}"] = float(values)
                continue
            for layer, value in enumerate(values):
                if isinstance(value, list):
                    for head, v in enumerate(value):
                        flat[f"{site}/{name}/{layer}/{head}"] = v
                else:
                    flat[f"{site}/{name}/{layer}"] = value
    return flat
