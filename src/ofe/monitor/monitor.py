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
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ofe.monitor.measure import (DEFAULT_METRICS, PROBS_SITE, Costs, Pending, Results, check_metrics, combine,
                                 gather_local, site_partials)
from ofe.monitor.sites import Target, find_targets


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
        median_max_elements: ``abs_max_median``'s median is taken over at most this many evenly
            spaced entries of a layer's activation (None: all, exact).

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
        median_max_elements: int | None = 1 << 14,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self._model = model
        self.every = every
        self.metrics = check_metrics(metrics)
        self.costs = Costs(max_tokens=max_tokens, mmr_max_rows=mmr_max_rows, median_max_elements=median_max_elements)
        self._active = False
        self._pending: list[Pending] = []
        self._targets = find_targets(model, sites, modules, pattern)
        self._taps = [t.module for t in self._targets if t.is_tap]
        for target in self._targets:
            if target.is_tap and target.site == PROBS_SITE:
                target.module.max_batch = probs_max_batch
        # never traced by torch.compile (graph break); applied here, not as a decorator, because
        # torch.compiler.disable imports torch._dynamo (~2.5 s), which a bare `import ofe` should not pay
        self._record = torch.compiler.disable(self._record_partials)
        self._handles = [t.module.register_forward_hook(self._hook_for(t)) for t in self._targets]

    def shard(self, rank: int, world: int) -> None:
        """Observe the ``rank``-th of ``world`` equal slices of each global batch (data parallelism):
        the token and sequence samples (``mmr_max_rows``, ``probs_max_batch``) become this rank's part
        of the sample one process would draw from the global batch, so that :meth:`collect` with a
        gather across ranks gives the global batch's metrics."""
        self.costs = dataclasses.replace(self.costs, rank=rank, world=world)
        for target in self._targets:
            if target.is_tap and target.site == PROBS_SITE:
                target.module.batch_rank = rank

    def _hook_for(self, target: Target) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if self._active:
                self._record(target.site, target.layer, output[0] if isinstance(output, (tuple, list)) else output)

        return hook

    @torch.no_grad()
    def _record_partials(self, site: str, layer: int, x: Tensor) -> None:
        """Compute this site's partials for one layer now (:mod:`ofe.monitor.reduce`); keep only
        those (tiny) tensors, never the activation."""
        for name, value in site_partials(site, x.detach(), self.metrics, self.costs):
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

    def collect(self, gather: Callable[[Tensor], Tensor] = gather_local) -> Results | None:
        """Results recorded since the last call, or None if nothing was recorded.

        Returns ``{site: {metric: [value per layer]}}`` where a value is a float
        (``attention_entropy``, ``sink_score``: a list of per-head floats), plus ``int8_outlier_dims``
        as one int per site. A layer observed several times (gradient accumulation) gives the metric
        of everything it saw, and with ``gather`` (``(K,)`` -> ``(world, K)``, one collective, e.g.
        :func:`ofe.monitor.measure.gather_across_ranks`) of what every data-parallel rank saw: the
        global batch's metric (:mod:`ofe.monitor.reduce` says which metrics are exact). One
        device-to-host transfer; every rank must have observed the same sites.
        """
        if not self._pending:
            return None
        pending, self._pending = self._pending, []
        return combine(pending, gather)

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
        for target in self._targets:
            if target.is_tap and target.site == PROBS_SITE:
                target.module.max_batch = None
                target.module.batch_rank = 0

    def __enter__(self) -> OutlierMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
