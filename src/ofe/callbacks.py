"""The OutlierMonitor as a Hugging Face ``Trainer`` callback and a PyTorch Lightning callback.

Both observe the training forward pass on due steps and log the per-layer metrics through the
framework's own loggers (``Trainer.log`` / the Lightning trainer's loggers), as flat scalars named
``ofe/<site>/<metric>/<layer>`` plus ``ofe/<site>/<metric>/max``. The frameworks are optional
imports: constructing a callback without its framework installed raises an ImportError saying what
to install.

    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds)
    trainer.add_callback(HFOutlierCallback(trainer, every=50))

    lightning.Trainer(callbacks=[LightningOutlierCallback(every=50)]).fit(module)

Both also take the quantisation probe of ``ofe train --quant_probe`` (:mod:`ofe.quant.probe`):
``quant_probe=N`` with held-out ``probe_windows`` ``(N, T + 1)`` and ``probe_calibration`` (a list
of ``(B, T)`` batches from other text) logs ``ofe/quant/w8a8_probe_pct`` and ``.../w4a4_probe_pct``,
the perplexity cost of the simulated quantised model, after every N-th update.
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch import Tensor, nn

from ofe.models import GPT
from ofe.monitor import DEFAULT_METRICS, OutlierMonitor, Results, flatten_results
from ofe.quant.probe import QuantProbe


def scalars(results: Results) -> dict[str, float]:
    """Flat ``ofe/site/metric/layer`` scalars (attention entropy averaged over heads) and per-metric maxima."""
    out: dict[str, float] = {}
    for site, by_metric in results.items():
        for name, values in by_metric.items():
            if isinstance(values, list) and values and isinstance(values[0], list):  # per-head lists
                values = [sum(v) / len(v) for v in values]
            for key, value in flatten_results({site: {name: values}}).items():
                out[f"ofe/{key}"] = value
            if isinstance(values, list) and values:
                out[f"ofe/{site}/{name}/max"] = max(values)
    return out


def make_probe(quant_probe: int, windows: Tensor | None, calibration: list[Tensor] | None) -> QuantProbe | None:
    """The callbacks' quantisation probe (None when ``quant_probe`` is 0); a missing argument is an error."""
    if isinstance(quant_probe, bool) or not isinstance(quant_probe, int) or quant_probe < 0:
        raise ValueError(f"quant_probe must be a step interval >= 0 (0: off), got {quant_probe!r}")
    if not quant_probe:
        return None
    if windows is None or calibration is None:
        raise ValueError("quant_probe needs probe_windows ((N, T + 1) held-out token ids) and probe_calibration "
                         "(a list of (B, T) token batches from other text)")
    return QuantProbe(windows, list(calibration))


def _is_language_model(module: nn.Module) -> bool:
    return isinstance(module, GPT) or callable(getattr(module, "get_output_embeddings", None))


def language_model(module: nn.Module) -> nn.Module:
    """What the probe measures: ``module`` itself if it is an ``ofe`` GPT or a Hugging Face model,
    else the first such submodule (a LightningModule's ``self.model``)."""
    found = next((m for m in module.modules() if _is_language_model(m)), None)
    if found is None:
        raise ValueError(f"quant_probe: {type(module).__name__} holds no ofe GPT or Hugging Face causal LM to probe")
    return found


class _Observer:
    """Shared by both callbacks: attach once, observe due steps, return scalars to log."""

    def __init__(self, every: int, metrics, monitor_kwargs: dict[str, Any], probe_every: int = 0,
                 probe: QuantProbe | None = None) -> None:
        self.every, self.metrics, self.kwargs = every, metrics, monitor_kwargs
        self.probe_every, self.probe = probe_every, probe
        self.monitor: OutlierMonitor | None = None
        self.model: nn.Module | None = None
        self._ctx: contextlib.AbstractContextManager | None = None

    def attach(self, model: nn.Module) -> None:
        self.model = language_model(model) if self.probe is not None else model
        if self.monitor is None:
            self.monitor = OutlierMonitor(model, every=self.every, metrics=self.metrics, **self.kwargs)

    def begin(self, step: int) -> None:
        self._ctx = self.monitor.observe(step)
        self._ctx.__enter__()

    def end(self) -> dict[str, float]:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None
        results = self.monitor.collect()
        return scalars(results) if results else {}

    def probe_scalars(self, updates: int) -> dict[str, float]:
        """The probe's ``ofe/quant/<format>_probe_pct`` after ``updates`` optimizer updates, when due."""
        if self.probe is None or self.model is None or updates % self.probe_every:
            return {}
        return {f"ofe/quant/{k}": v for k, v in self.probe.measure(self.model).items()}

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None


def _hf_base():
    try:
        from transformers import TrainerCallback
    except ImportError:
        raise ImportError("HFOutlierCallback needs transformers: pip install 'ofe[hf]'") from None
    return TrainerCallback


def HFOutlierCallback(trainer=None, every: int = 10, metrics=DEFAULT_METRICS, quant_probe: int = 0,  # noqa: N802
                      probe_windows: Tensor | None = None, probe_calibration: list[Tensor] | None = None,
                      **monitor_kwargs):
    """A ``transformers.TrainerCallback`` logging outlier metrics every ``every`` optimizer steps
    (and the quantisation probe after every ``quant_probe``-th update, see the module docstring).

    With ``trainer`` the scalars go through ``trainer.log`` (so every reporting integration, e.g.
    TensorBoard, and ``trainer.state.log_history`` get them); without it they are appended to
    ``state.log_history`` only.
    """
    base = _hf_base()
    probe = make_probe(quant_probe, probe_windows, probe_calibration)

    class _Callback(base):
        def __init__(self) -> None:
            self.observer = _Observer(every, metrics, monitor_kwargs, quant_probe, probe)
            self.trainer = trainer

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.observer.attach(model)

        def on_step_begin(self, args, state, control, **kwargs):
            self.observer.begin(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            logs = {**self.observer.end(), **self.observer.probe_scalars(state.global_step)}
            if logs:
                if self.trainer is not None:
                    self.trainer.log(logs)
                else:
                    state.log_history.append({**logs, "step": state.global_step})

        def on_train_end(self, args, state, control, **kwargs):
            self.observer.close()

    return _Callback()


def LightningOutlierCallback(every: int = 10, metrics=DEFAULT_METRICS, quant_probe: int = 0,  # noqa: N802
                             probe_windows: Tensor | None = None, probe_calibration: list[Tensor] | None = None,
                             **monitor_kwargs):
    """A ``lightning.pytorch.Callback`` logging outlier metrics every ``every`` training batches to
    every logger of the Lightning ``Trainer`` (``logger.log_metrics``), at the global step (and the
    quantisation probe after every ``quant_probe``-th update, see the module docstring)."""
    probe = make_probe(quant_probe, probe_windows, probe_calibration)
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError:
            raise ImportError("LightningOutlierCallback needs lightning: pip install lightning") from None

    class _Callback(Callback):
        def __init__(self) -> None:
            self.observer = _Observer(every, metrics, monitor_kwargs, quant_probe, probe)

        def on_fit_start(self, trainer, pl_module):
            self.observer.attach(pl_module)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.observer.begin(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logs = {**self.observer.end(), **self.observer.probe_scalars(trainer.global_step)}
            if logs:  # straight to the loggers: log_dict would repeat stale values on unmonitored steps
                for logger in trainer.loggers:
                    logger.log_metrics(logs, step=trainer.global_step)

        def on_fit_end(self, trainer, pl_module):
            self.observer.close()

    return _Callback()
